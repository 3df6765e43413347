//! A GCRA meter for token limits, lock-free like governor's, plus the one
//! thing governor does not offer: giving back what a call did not use.
//! A call is charged its upper bound at admission and corrected after it,
//! so a token limit must be able to refund (and to charge an overrun).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

/// The state is the theoretical arrival time (TAT) in nanoseconds since
/// `origin`: a charge of `n` moves it `n × emission` forward; a charge is
/// admitted while the TAT stays within `tolerance` (one minute's worth) of now.
#[derive(Debug)]
pub struct TokenMeter {
    per_minute: u64,
    emission_ns: u64,
    tolerance_ns: u64,
    origin: Instant,
    /// Written by every charge; kept off the line of the read-only fields.
    tat_ns: CachePadded<AtomicU64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Fits after waiting this long.
    Wait(Duration),
    /// Larger than the limit allows in a minute: never fits.
    TooLarge,
}

impl TokenMeter {
    pub fn per_minute(per_minute: u64) -> TokenMeter {
        let per_minute = per_minute.max(1);
        let emission_ns = (60_000_000_000 / per_minute).max(1);
        TokenMeter {
            per_minute,
            emission_ns,
            tolerance_ns: emission_ns * per_minute,
            origin: Instant::now(),
            // Start full: the first minute's worth is available at once.
            tat_ns: CachePadded::new(AtomicU64::new(0)),
        }
    }

    pub fn limit(&self) -> u64 {
        self.per_minute
    }

    fn now_ns(&self) -> u64 {
        // Offset by the tolerance so "full" (TAT = now - tolerance) never
        // needs a negative number.
        self.origin.elapsed().as_nanos() as u64 + self.tolerance_ns
    }

    /// Charges `n` if it fits now.
    pub fn try_charge(&self, n: u64) -> Result<(), Refused> {
        if n > self.per_minute {
            return Err(Refused::TooLarge);
        }
        let cost = n * self.emission_ns;
        let now = self.now_ns();
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let new_tat = tat.max(now - self.tolerance_ns) + cost;
            if new_tat > now {
                return Err(Refused::Wait(Duration::from_nanos(new_tat - now)));
            }
            match self.tat_ns.compare_exchange_weak(
                tat,
                new_tat,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Charges `n` whether or not it fits (a provider billed more than the
    /// call's upper bound); later calls wait for it.
    pub fn force_charge(&self, n: u64) {
        let cost = n.saturating_mul(self.emission_ns);
        let now = self.now_ns();
        let _ = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now - self.tolerance_ns).saturating_add(cost))
            });
    }

    /// Gives back `n` charged earlier and not used.
    pub fn refund(&self, n: u64) {
        let cost = n.saturating_mul(self.emission_ns);
        let now = self.now_ns();
        let _ = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.saturating_sub(cost).max(now - self.tolerance_ns))
            });
    }

    /// What could be charged now, and how long until the meter is full again.
    pub fn snapshot(&self) -> (u64, Duration) {
        let now = self.now_ns();
        let tat = self
            .tat_ns
            .load(Ordering::Relaxed)
            .max(now - self.tolerance_ns);
        let used_ns = tat + self.tolerance_ns - now;
        let remaining = (self.tolerance_ns.saturating_sub(used_ns)) / self.emission_ns;
        (
            remaining.min(self.per_minute),
            Duration::from_nanos(used_ns),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_minutes_worth_then_refuses_with_the_wait() {
        let meter = TokenMeter::per_minute(6_000);
        assert_eq!(meter.try_charge(6_001), Err(Refused::TooLarge));
        meter.try_charge(5_000).unwrap();
        meter.try_charge(1_000).unwrap();
        match meter.try_charge(100) {
            Err(Refused::Wait(wait)) => {
                // 100 tokens at 100 per second.
                assert!(
                    wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
                    "{wait:?}"
                );
            }
            other => panic!("expected a wait, got {other:?}"),
        }
        assert_eq!(meter.snapshot().0, 0);
    }

    #[test]
    fn refunds_make_room_and_never_exceed_a_full_meter() {
        let meter = TokenMeter::per_minute(1_000);
        meter.try_charge(1_000).unwrap();
        assert!(meter.try_charge(10).is_err());
        meter.refund(400);
        meter.try_charge(400).unwrap();
        assert!(meter.try_charge(10).is_err());
        // Refunding more than was charged only fills the meter.
        meter.refund(10_000);
        assert_eq!(meter.snapshot().0, 1_000);
        meter.try_charge(1_000).unwrap();
    }

    #[test]
    fn a_forced_charge_pushes_later_calls_back() {
        let meter = TokenMeter::per_minute(600);
        meter.force_charge(900);
        match meter.try_charge(1) {
            Err(Refused::Wait(wait)) => assert!(wait >= Duration::from_secs(29), "{wait:?}"),
            other => panic!("expected a wait, got {other:?}"),
        }
    }
}
