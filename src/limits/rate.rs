//! Request and token rate limits per agent, per model and globally.
//!
//! Requests are counted by governor's GCRA; tokens by `TokenMeter`, the same
//! algorithm with refunds, because a call is charged its upper bound at
//! admission and corrected once the provider has said what it used. The whole
//! set is swapped atomically when an operator changes a limit at runtime; a
//! scope whose limit did not change keeps its meters (and their state).
//!
//! Each scope's meters live for the rest of the process (`&'static`): they
//! are made at start and by operators' changes, a few hundred bytes each,
//! and a call can then point at them without touching a shared reference
//! count on every admission and settlement.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_utils::CachePadded;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::gcra::{Refused, TokenMeter};
use super::scope::LimitScope;
use crate::proxy::upstream::glob_match;

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Requests per minute for one scope.
pub struct RequestLimiter {
    per_minute: u32,
    limiter: Direct,
    clock: DefaultClock,
}

impl std::fmt::Debug for RequestLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLimiter")
            .field("per_minute", &self.per_minute)
            .finish()
    }
}

impl RequestLimiter {
    fn per_minute(per_minute: NonZeroU32) -> RequestLimiter {
        let clock = DefaultClock::default();
        RequestLimiter {
            per_minute: per_minute.get(),
            limiter: RateLimiter::direct_with_clock(Quota::per_minute(per_minute), clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
        }
    }
}

/// The limits of one scope as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitValues {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl LimitValues {
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

/// The meters of one scope.
#[derive(Debug)]
pub struct ScopeLimit {
    pub scope: LimitScope,
    pub values: LimitValues,
    requests: Option<CachePadded<RequestLimiter>>,
    tokens: Option<TokenMeter>,
}

impl ScopeLimit {
    /// A scope's meters, kept for the rest of the process (see the module doc).
    fn leak(scope: LimitScope, values: LimitValues) -> &'static ScopeLimit {
        Box::leak(Box::new(ScopeLimit::new(scope, values)))
    }

    pub fn new(scope: LimitScope, values: LimitValues) -> ScopeLimit {
        ScopeLimit {
            scope,
            values,
            requests: values
                .requests_per_minute
                .and_then(NonZeroU32::new)
                .map(|n| CachePadded::new(RequestLimiter::per_minute(n))),
            tokens: values
                .tokens_per_minute
                .filter(|&n| n > 0)
                .map(TokenMeter::per_minute),
        }
    }
}

/// What a refused call is told: which limit, and the OpenAI-style numbers
/// its SDK reads to wait the right time.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRefusal {
    pub scope: LimitScope,
    pub what: LimitedBy,
    /// `None` when the call can never fit (larger than the limit allows).
    pub retry_after: Option<Duration>,
    pub headers: RateHeaders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    Requests,
    Tokens { asked: u64 },
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of the scopes
/// that bound the call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateHeaders {
    pub requests: Option<HeaderNumbers>,
    pub tokens: Option<HeaderNumbers>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeaderNumbers {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// Tokens charged at admission, to correct when the call's usage is known.
#[derive(Debug, Default)]
pub struct TokenCharge {
    meters: [Option<&'static ScopeLimit>; 3],
    charged: u64,
}

impl TokenCharge {
    /// Replaces the admission charge with what the call really used.
    pub fn settle(mut self, used: u64) {
        let meters = std::mem::take(&mut self.meters);
        for scope in meters.into_iter().flatten() {
            let Some(meter) = &scope.tokens else { continue };
            if used <= self.charged {
                meter.refund(self.charged - used);
            } else {
                meter.force_charge(used - self.charged);
            }
        }
    }

    /// The call never ran: give everything back.
    pub fn release(self) {
        self.settle(0);
    }

    pub fn charged(&self) -> u64 {
        self.charged
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        for scope in self.meters.iter_mut().filter_map(Option::take) {
            if let Some(meter) = &scope.tokens {
                meter.refund(self.charged);
            }
        }
    }
}

/// Every configured rate limit.
#[derive(Debug, Default)]
pub struct RateLimits {
    global: Option<&'static ScopeLimit>,
    agents: HashMap<Arc<str>, &'static ScopeLimit>,
    models: Vec<&'static ScopeLimit>,
}

impl RateLimits {
    pub fn new(limits: impl IntoIterator<Item = (LimitScope, LimitValues)>) -> RateLimits {
        let mut set = RateLimits::default();
        for (scope, values) in limits {
            set.put(ScopeLimit::leak(scope, values));
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.global.is_none() && self.agents.is_empty() && self.models.is_empty()
    }

    fn put(&mut self, limit: &'static ScopeLimit) {
        let empty = limit.values.is_empty();
        match &limit.scope {
            LimitScope::Global => self.global = (!empty).then_some(limit),
            LimitScope::Agent(name) => {
                if empty {
                    self.agents.remove(name.as_str());
                } else {
                    self.agents.insert(name.as_str().into(), limit);
                }
            }
            LimitScope::Model(_) => {
                let at = self.models.iter().position(|m| m.scope == limit.scope);
                match (at, empty) {
                    (Some(i), true) => {
                        self.models.remove(i);
                    }
                    (Some(i), false) => self.models[i] = limit,
                    (None, false) => self.models.push(limit),
                    (None, true) => {}
                }
            }
        }
    }

    /// A copy of this set with one scope's limits replaced (removed when
    /// `values` is empty); every other scope keeps its meters.
    pub fn with(&self, scope: LimitScope, values: LimitValues) -> RateLimits {
        let mut next = RateLimits {
            global: self.global,
            agents: self.agents.clone(),
            models: self.models.clone(),
        };
        next.put(ScopeLimit::leak(scope, values));
        next
    }

    pub fn all(&self) -> Vec<&'static ScopeLimit> {
        let mut all: Vec<_> = self.global.iter().copied().collect();
        let mut agents: Vec<_> = self.agents.values().copied().collect();
        agents.sort_by_key(|a| a.scope.to_string());
        all.extend(agents);
        all.extend(self.models.iter().copied());
        all
    }

    /// The scopes that apply to a call: its agent's, the first model entry
    /// matching its model, and the global one.
    fn applicable(&self, agent: &str, model: &str) -> [Option<&'static ScopeLimit>; 3] {
        [
            self.agents.get(agent).copied(),
            self.models
                .iter()
                .find(|m| match &m.scope {
                    LimitScope::Model(glob) => glob_match(glob, model),
                    _ => false,
                })
                .copied(),
            self.global,
        ]
    }

    /// Counts one request against every scope that applies.
    pub fn admit_request(
        &self,
        agent: &str,
        model: &str,
    ) -> Result<Option<HeaderNumbers>, Box<RateRefusal>> {
        let mut tightest: Option<HeaderNumbers> = None;
        for scope in self.applicable(agent, model).into_iter().flatten() {
            let Some(requests) = &scope.requests else {
                continue;
            };
            match requests.limiter.check() {
                Ok(snapshot) => {
                    let numbers = HeaderNumbers {
                        limit: u64::from(requests.per_minute),
                        remaining: u64::from(snapshot.remaining_burst_capacity()),
                        reset: reset_of(requests.per_minute, snapshot.remaining_burst_capacity()),
                    };
                    if tightest.is_none_or(|t| numbers.remaining < t.remaining) {
                        tightest = Some(numbers);
                    }
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(requests.clock.now());
                    return Err(Box::new(RateRefusal {
                        scope: scope.scope.clone(),
                        what: LimitedBy::Requests,
                        retry_after: Some(wait),
                        headers: RateHeaders {
                            requests: Some(HeaderNumbers {
                                limit: u64::from(requests.per_minute),
                                remaining: 0,
                                reset: wait,
                            }),
                            tokens: None,
                        },
                    }));
                }
            }
        }
        Ok(tightest)
    }

    /// Charges `tokens` (the call's upper bound) to every scope with a token
    /// limit; all or none.
    pub fn charge_tokens(
        &self,
        agent: &str,
        model: &str,
        tokens: u64,
    ) -> Result<TokenCharge, Box<RateRefusal>> {
        let mut charge = TokenCharge {
            meters: [None; 3],
            charged: tokens,
        };
        for (slot, scope) in self.applicable(agent, model).into_iter().enumerate() {
            let Some(scope) = scope else { continue };
            let Some(meter) = &scope.tokens else { continue };
            match meter.try_charge(tokens) {
                Ok(()) => charge.meters[slot] = Some(scope),
                Err(refused) => {
                    let (remaining, reset) = meter.snapshot();
                    let retry_after = match refused {
                        Refused::Wait(wait) => Some(wait),
                        Refused::TooLarge => None,
                    };
                    // Dropping the charge refunds the scopes already charged.
                    drop(charge);
                    return Err(Box::new(RateRefusal {
                        scope: scope.scope.clone(),
                        what: LimitedBy::Tokens { asked: tokens },
                        retry_after,
                        headers: RateHeaders {
                            requests: None,
                            tokens: Some(HeaderNumbers {
                                limit: meter.limit(),
                                remaining,
                                reset: retry_after.unwrap_or(reset),
                            }),
                        },
                    }));
                }
            }
        }
        Ok(charge)
    }

    /// Tokens one scope could admit now, for operators.
    pub fn tokens_available(limit: &ScopeLimit) -> Option<u64> {
        limit.tokens.as_ref().map(|t| t.snapshot().0)
    }
}

/// Time until a request meter with `remaining` slots left is full again.
fn reset_of(per_minute: u32, remaining: u32) -> Duration {
    let missing = per_minute.saturating_sub(remaining);
    Duration::from_secs(60) * missing / per_minute.max(1)
}

/// A duration the way OpenAI writes `x-ratelimit-reset-*`: `1s`, `6m0s`, `20ms`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let text = format!("{secs:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    let whole = d.as_secs();
    if whole < 3_600 {
        return format!("{}m{}s", whole / 60, whole % 60);
    }
    format!("{}h{}m{}s", whole / 3_600, whole / 60 % 60, whole % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RateLimits {
        RateLimits::new([
            (
                LimitScope::Agent("a".into()),
                LimitValues {
                    requests_per_minute: Some(2),
                    tokens_per_minute: Some(1_000),
                },
            ),
            (
                LimitScope::Model("gpt-4o*".into()),
                LimitValues {
                    requests_per_minute: None,
                    tokens_per_minute: Some(500),
                },
            ),
        ])
    }

    #[test]
    fn request_limit_refuses_the_third_call_with_a_wait() {
        let limits = limits();
        let first = limits.admit_request("a", "gpt-4o").unwrap().unwrap();
        assert_eq!((first.limit, first.remaining), (2, 1));
        limits.admit_request("a", "gpt-4o").unwrap();
        let refusal = limits.admit_request("a", "gpt-4o").unwrap_err();
        assert_eq!(refusal.what, LimitedBy::Requests);
        let wait = refusal.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        // Another agent is not limited.
        assert_eq!(limits.admit_request("b", "gpt-4o").unwrap(), None);
    }

    #[test]
    fn token_charges_are_all_or_nothing_and_corrected() {
        let limits = limits();
        // The model scope (500) is tighter than the agent's (1000).
        let refusal = limits.charge_tokens("a", "gpt-4o", 600).unwrap_err();
        assert_eq!(refusal.scope, LimitScope::Model("gpt-4o*".into()));
        assert_eq!(refusal.retry_after, None, "600 never fits in 500 a minute");
        // The agent's meter was refunded when the model's refused.
        let charge = limits.charge_tokens("a", "gpt-4o-mini", 400).unwrap();
        charge.settle(100);
        let charge = limits.charge_tokens("a", "gpt-4o", 400).unwrap();
        assert!(limits.charge_tokens("a", "gpt-4o", 200).is_err());
        drop(charge);
        limits
            .charge_tokens("a", "gpt-4o", 200)
            .unwrap()
            .settle(200);
        // Other models only meet the agent's limit: 1000 - 100 - 200 left.
        limits
            .charge_tokens("a", "claude-x", 700)
            .unwrap()
            .settle(700);
        assert!(limits.charge_tokens("a", "claude-x", 50).is_err());
    }

    #[test]
    fn changing_one_scope_keeps_the_others_meters() {
        let limits = limits();
        limits
            .charge_tokens("a", "o3", 1_000)
            .unwrap()
            .settle(1_000);
        let next = limits.with(
            LimitScope::Global,
            LimitValues {
                requests_per_minute: Some(100),
                tokens_per_minute: None,
            },
        );
        assert!(
            next.charge_tokens("a", "o3", 10).is_err(),
            "the agent's meter is still spent"
        );
        let next = next.with(LimitScope::Agent("a".into()), LimitValues::default());
        next.charge_tokens("a", "o3", 10).unwrap();
        assert_eq!(next.all().len(), 2);
    }

    #[test]
    fn durations_in_openai_style() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
    }
}
