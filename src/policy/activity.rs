//! An agent's calls and errors over the last minute, for policies such as
//! `runaway_guard`: one-second buckets of atomics, no lock.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::record::now_micros;

const SECONDS: usize = 60;

/// Each bucket packs the second it counts (high 32 bits) and its count.
#[derive(Debug)]
struct Window {
    buckets: [AtomicU64; SECONDS],
    /// The second last summed (high 32 bits) and the count of the 59
    /// seconds before it: a call reads two words, not sixty, until the
    /// second turns.
    earlier: AtomicU64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            earlier: AtomicU64::new(0),
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

    /// Counts of the 60 seconds up to and including `now_s`. A call still
    /// counting into the second just past when the sum of the earlier ones
    /// is taken is missed by the rest of this second's sums: the window is
    /// exact but for such stragglers.
    fn sum(&self, now_s: u64) -> u64 {
        let earlier = self.earlier.load(Ordering::Relaxed);
        let earlier = if earlier >> 32 == now_s & 0xffff_ffff {
            earlier & 0xffff_ffff
        } else {
            let first = now_s.saturating_sub(SECONDS as u64 - 1);
            let sum = (first..now_s).map(|second| self.count(second)).sum::<u64>();
            self.earlier
                .store((now_s << 32) | sum.min(0xffff_ffff), Ordering::Relaxed);
            sum
        };
        earlier + self.count(now_s)
    }

    /// The count of one second, if its bucket still holds it.
    fn count(&self, second: u64) -> u64 {
        let bucket = self.buckets[second as usize % SECONDS].load(Ordering::Relaxed);
        if bucket >> 32 == second & 0xffff_ffff {
            bucket & 0xffff_ffff
        } else {
            0
        }
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
        // The current second is read live, the earlier ones once a second:
        // a straggler into an earlier second counts from the next one on.
        activity.calls.add(t + 4);
        activity.calls.add(t + 3);
        assert_eq!(activity.counts_at(t + 4).calls_last_minute, 11);
        assert_eq!(activity.counts_at(t + 5).calls_last_minute, 12);
        assert_eq!(activity.counts_at(t + 4).calls_last_minute, 12);
        // A minute later the first second has left the window.
        assert_eq!(activity.counts_at(t + 60).calls_last_minute, 10);
        // A bucket reused for a new second starts again from one.
        activity.calls.add(t + 60);
        assert_eq!(activity.counts_at(t + 60).calls_last_minute, 11);
        assert_eq!(activity.counts_at(t + 200).calls_last_minute, 0);
    }
}
