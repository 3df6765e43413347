//! Circuit breakers for runaway spend: request and token rate limits and
//! money budgets, checked on the request path in the contract's order —
//! requests, then the budget reservation, then tokens — and settled when the
//! call ends.

pub mod budget;
pub mod gcra;
pub mod period;
pub mod rate;
pub mod scope;

use std::sync::Mutex;

use arc_swap::ArcSwap;

use crate::metering::prices::ModelPrice;
use crate::money::Usd;
use crate::providers::{Endpoint, Usage};
pub use budget::{BudgetBook, BudgetHold, BudgetRefusal, BudgetSpec, BudgetStatus, OnExceed};
pub use period::Period;
pub use rate::{HeaderNumbers, LimitValues, RateLimits, RateRefusal, TokenCharge};
pub use scope::{BudgetScope, CallSubject, LimitScope};

/// Output tokens assumed for a call that sets no `max_tokens` and whose
/// model's maximum output is unknown.
pub const DEFAULT_OUTPUT_UPPER_BOUND: u64 = 4_096;
/// Tokens counted for one inline (base64) image: above what OpenAI and
/// Anthropic bill for the largest image they accept at full detail.
pub const IMAGE_TOKENS_UPPER_BOUND: u64 = 1_600;

#[derive(Debug)]
pub enum AdmitError {
    Rate(Box<RateRefusal>),
    Budget(Box<BudgetRefusal>),
    /// A budget counts this call but its model has no price.
    Unpriced,
}

/// What a call holds while it runs: its token charge and budget
/// reservations. Dropping it unsettled gives both back.
#[derive(Debug, Default)]
pub struct Admission {
    tokens: TokenCharge,
    budget: BudgetHold,
    /// The tightest request limit, for the response headers.
    pub requests: Option<HeaderNumbers>,
}

impl Admission {
    /// The exhausted budget that lets this call go only with an approval
    /// (taken: the call keeps only the approval it asks for).
    pub fn take_needs_approval(&mut self) -> Option<Box<BudgetRefusal>> {
        self.budget.needs_approval.take()
    }

    /// Replaces the admission charges with what the call used and cost.
    /// Returns the smallest remaining amount of the call's budgets.
    pub fn settle(self, usage: &Usage, cost: Option<Usd>, now_us: i64) -> Option<Usd> {
        let Admission { tokens, budget, .. } = self;
        tokens.settle(usage.input_tokens + usage.output_tokens);
        match cost {
            Some(cost) => budget.settle(cost, now_us),
            // Unpriced calls never hold a reservation (they are refused when
            // a budget applies), so there is nothing to count.
            None => None,
        }
    }
}

/// The facts of one call that admission needs.
pub struct CallFacts<'a> {
    pub subject: CallSubject<'a>,
    pub endpoint: Endpoint,
    pub body: &'a [u8],
    pub max_tokens: Option<u64>,
    pub price: Option<&'a ModelPrice>,
}

impl CallFacts<'_> {
    fn upper_bound(&self) -> UpperBound {
        UpperBound::of(self.endpoint, self.body, self.max_tokens, self.price)
    }
}

/// The most a call can use and cost before it runs: what admission
/// reserves, what policies see and what an approval request shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpperBound {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `None` for a model without a price.
    pub cost: Option<Usd>,
}

impl UpperBound {
    pub fn of(
        endpoint: Endpoint,
        body: &[u8],
        max_tokens: Option<u64>,
        price: Option<&ModelPrice>,
    ) -> UpperBound {
        let input_tokens = input_upper_bound(body);
        let output_tokens = output_upper_bound(endpoint, max_tokens, price);
        UpperBound {
            input_tokens,
            output_tokens,
            cost: price.map(|p| p.upper_bound_cost(input_tokens, output_tokens)),
        }
    }
}

/// The most output a call can produce: its `max_tokens`, else its model's
/// maximum output, else `DEFAULT_OUTPUT_UPPER_BOUND`; embeddings none.
pub fn output_upper_bound(
    endpoint: Endpoint,
    max_tokens: Option<u64>,
    price: Option<&ModelPrice>,
) -> u64 {
    if endpoint == Endpoint::Embeddings {
        return 0;
    }
    max_tokens
        .or(price.and_then(|p| p.max_output_tokens))
        .unwrap_or(DEFAULT_OUTPUT_UPPER_BOUND)
}

/// Rate limits and budgets, changeable at runtime.
pub struct Limits {
    rates: ArcSwap<RateLimits>,
    budgets: BudgetBook,
    edit: Mutex<()>,
}

impl Limits {
    pub fn new(rates: RateLimits, budgets: BudgetBook) -> Limits {
        Limits {
            rates: ArcSwap::from_pointee(rates),
            budgets,
            edit: Mutex::new(()),
        }
    }

    pub fn budgets(&self) -> &BudgetBook {
        &self.budgets
    }

    pub fn rates(&self) -> arc_swap::Guard<std::sync::Arc<RateLimits>> {
        self.rates.load()
    }

    /// Replaces one scope's rate limits (removes them when `values` is empty).
    pub fn set_rate(&self, scope: LimitScope, values: LimitValues) {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let next = self.rates.load().with(scope, values);
        self.rates.store(std::sync::Arc::new(next));
    }

    /// Admits a call or says which limit refused it. All charges are made
    /// or none.
    pub fn admit(&self, call: &CallFacts<'_>) -> Result<Admission, AdmitError> {
        let rates = self.rates.load();
        let budgets_apply = !self.budgets.is_empty()
            && call.endpoint.is_billed()
            && self.budgets.applies_to(&call.subject);
        if rates.is_empty() && !budgets_apply {
            return Ok(Admission::default());
        }
        let (agent, model) = (call.subject.agent, call.subject.model);
        let requests = rates
            .admit_request(agent, model)
            .map_err(AdmitError::Rate)?;
        if !call.endpoint.is_billed() {
            return Ok(Admission {
                requests,
                ..Admission::default()
            });
        }
        let bound = call.upper_bound();
        let budget = if budgets_apply {
            let amount = bound.cost.ok_or(AdmitError::Unpriced)?;
            self.budgets
                .reserve(&call.subject, amount, crate::store::record::now_micros())
                .map_err(AdmitError::Budget)?
        } else {
            BudgetHold::default()
        };
        let tokens = rates
            .charge_tokens(agent, model, bound.input_tokens + bound.output_tokens)
            .map_err(AdmitError::Rate)?;
        Ok(Admission {
            tokens,
            budget,
            requests,
        })
    }
}

/// An upper bound of the input tokens of a request body, read without
/// parsing it: every token of text covers at least one byte and, for the
/// languages and code models read, close to four, so half the body's
/// length is a bound with room to spare (JSON punctuation and keys are
/// counted too). Inline base64 images would dwarf that and are counted at
/// `IMAGE_TOKENS_UPPER_BOUND` each instead. Underestimates are possible for
/// pathological text; the provider's count corrects every charge afterwards,
/// and a budget that a call overran is alerted.
pub fn input_upper_bound(body: &[u8]) -> u64 {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b";base64,"));
    let finder = &*FINDER;
    let mut text_bytes = body.len() as u64;
    let mut images = 0u64;
    let mut at = 0;
    while let Some(found) = finder.find(&body[at..]) {
        let start = at + found;
        let end = memchr::memchr(b'"', &body[start..]).map_or(body.len(), |e| start + e);
        text_bytes -= (end - start) as u64;
        images += 1;
        at = end;
    }
    text_bytes.div_ceil(2) + images * IMAGE_TOKENS_UPPER_BOUND
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_bound_counts_text_and_images_apart() {
        let text = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there"}]}"#;
        assert_eq!(input_upper_bound(text), (text.len() as u64).div_ceil(2));
        let image = format!(
            r#"{{"messages":[{{"content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]}}]}}"#,
            "A".repeat(100_000)
        );
        let bound = input_upper_bound(image.as_bytes());
        assert!(
            bound > IMAGE_TOKENS_UPPER_BOUND && bound < IMAGE_TOKENS_UPPER_BOUND + 100,
            "{bound}"
        );
    }

    #[test]
    fn the_bound_is_above_real_token_counts() {
        let prompt = "Summarise the quarterly report in three bullet points, then list the risks. "
            .repeat(20);
        let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}).to_string();
        let real = crate::metering::estimate::count_tokens("gpt-4o", &prompt);
        assert!(
            input_upper_bound(body.as_bytes()) > real + 4,
            "bound must hold the prompt and its framing"
        );
    }
}

/// Why the limits could not be rebuilt at start.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read budgets and limits back from the store: {0}")]
    Store(#[from] duckdb::Error),
    #[error(transparent)]
    Open(#[from] crate::store::StoreError),
    #[error("the store holds a runtime change Warden cannot read ({0}); fix or delete that row")]
    BadRow(String),
}

impl Limits {
    /// The configured limits and budgets, with operators' runtime changes
    /// from the store applied on top, and each budget's spend (and alerts
    /// already raised) in its current period rebuilt from `calls`.
    pub fn restore(
        config: &crate::config::Config,
        conn: &duckdb::Connection,
        alerts: crate::alerts::AlertSink,
    ) -> Result<Limits, RestoreError> {
        use crate::store::ledger;
        let now_us = crate::store::record::now_micros();

        let mut rates = config.rate_limits();
        for saved in ledger::saved_limits(conn)? {
            let scope =
                LimitScope::parse(&saved.scope).map_err(|e| RestoreError::BadRow(e.to_string()))?;
            let values = LimitValues {
                requests_per_minute: saved.requests_per_minute,
                tokens_per_minute: saved.tokens_per_minute,
            };
            rates.retain(|(s, _)| *s != scope);
            rates.push((scope, values));
        }

        let mut specs = config.budget_specs();
        for saved in ledger::saved_budgets(conn)? {
            let bad = |what: &str| RestoreError::BadRow(format!("budget_changes {what}"));
            let spec = BudgetSpec {
                scope: BudgetScope::parse(&saved.scope)
                    .map_err(|e| RestoreError::BadRow(e.to_string()))?,
                period: Period::parse(&saved.period).ok_or_else(|| bad(&saved.period))?,
                limit: saved.limit_usd,
                on_exceed: OnExceed::parse(&saved.on_exceed)
                    .ok_or_else(|| bad(&saved.on_exceed))?,
            };
            match specs
                .iter_mut()
                .find(|s| s.scope == spec.scope && s.period == spec.period)
            {
                Some(existing) => *existing = spec,
                None => specs.push(spec),
            }
        }
        let book = BudgetBook::new(&specs, alerts, now_us);

        // One pass over the store per distinct period start.
        let mut spend_cache: std::collections::HashMap<Option<i64>, Vec<ledger::SpendRow>> =
            Default::default();
        let mut alert_cache: std::collections::HashMap<Option<i64>, Vec<(String, String)>> =
            Default::default();
        for budget in book.budgets().iter() {
            let since = (budget.period != Period::Total).then(|| budget.period.start_of(now_us));
            if let std::collections::hash_map::Entry::Vacant(entry) = spend_cache.entry(since) {
                entry.insert(ledger::spend_since(conn, since)?);
                alert_cache.insert(since, ledger::alerts_since(conn, since)?);
            }
            let mut by_key: std::collections::BTreeMap<&str, Usd> = Default::default();
            for row in &spend_cache[&since] {
                let subject = CallSubject {
                    agent: row.agent.as_deref().unwrap_or(""),
                    model: row.model.as_deref().unwrap_or(""),
                    run_id: row.run_id.as_deref(),
                    workflow: None,
                };
                if let Some(key) = budget.scope.ledger_key(&subject) {
                    *by_key.entry(key).or_default() += row.cost;
                }
            }
            for (key, spent) in by_key {
                let subject = budget.subject(key);
                let alerted: Vec<u64> = alert_cache[&since]
                    .iter()
                    .filter(|(_, s)| *s == subject)
                    .filter_map(|(rule, _)| rule.strip_prefix("budget_")?.parse().ok())
                    .collect();
                budget.restore(key, spent, &alerted, now_us);
            }
        }
        Ok(Limits::new(RateLimits::new(rates), book))
    }
}
