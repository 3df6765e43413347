//! Money budgets that never overshoot.
//!
//! At admission a call reserves its upper-bound cost in every budget that
//! applies, all or none, each under that budget's own short lock (never held
//! across an await). When the call ends the reservation is replaced by the
//! exact cost, or released if it never ran. Spend passes a limit only when a
//! provider bills more than the upper bound; that is logged and alerted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::period::{Period, format_utc};
use super::scope::{BudgetScope, CallSubject};
use crate::alerts::{Alert, AlertSink, Severity};
use crate::money::Usd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    #[default]
    Deny,
    /// Until approvals exist, denies and says an approval would be needed.
    RequireApproval,
    /// Until halts exist, denies and says the scope would be halted.
    Halt,
    /// Never refuses; alerts only.
    Alert,
}

impl OnExceed {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExceed::Deny => "deny",
            OnExceed::RequireApproval => "require_approval",
            OnExceed::Halt => "halt",
            OnExceed::Alert => "alert",
        }
    }

    pub fn parse(text: &str) -> Option<OnExceed> {
        [
            OnExceed::Deny,
            OnExceed::RequireApproval,
            OnExceed::Halt,
            OnExceed::Alert,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// A budget as configured or set at runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSpec {
    pub scope: BudgetScope,
    pub period: Period,
    pub limit: Usd,
    pub on_exceed: OnExceed,
}

/// Percentages of the limit that raise an alert once per period.
const THRESHOLDS: [u64; 3] = [50, 80, 100];

#[derive(Debug, Clone, Copy)]
struct Ledger {
    start_us: i64,
    end_us: i64,
    spent: Usd,
    reserved: Usd,
    /// Bit i set: THRESHOLDS[i] has been alerted this period.
    alerted: u8,
}

impl Ledger {
    fn new(period: Period, now_us: i64) -> Ledger {
        let start_us = period.start_of(now_us);
        Ledger {
            start_us,
            end_us: period.end_of(start_us),
            spent: Usd::ZERO,
            reserved: Usd::ZERO,
            alerted: 0,
        }
    }

    fn roll(&mut self, period: Period, now_us: i64) {
        if now_us >= self.end_us {
            *self = Ledger::new(period, now_us);
        }
    }
}

#[derive(Debug)]
struct BudgetState {
    limit: Usd,
    on_exceed: OnExceed,
    /// The ledger of every scope but `run`.
    main: Ledger,
    /// `run` budgets: one ledger per run id.
    runs: HashMap<String, Ledger>,
}

impl BudgetState {
    fn ledger(&mut self, period: Period, key: &str, now_us: i64) -> &mut Ledger {
        let ledger = if key.is_empty() {
            &mut self.main
        } else {
            self.runs
                .entry(key.to_owned())
                .or_insert_with(|| Ledger::new(period, now_us))
        };
        ledger.roll(period, now_us);
        ledger
    }
}

/// A budget lives for the rest of the process once made (at start or by an
/// operator): calls point at it without a shared reference count to bump.
pub struct Budget {
    pub scope: BudgetScope,
    pub period: Period,
    state: Mutex<BudgetState>,
    alerts: AlertSink,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("scope", &self.scope)
            .field("period", &self.period)
            .finish()
    }
}

/// One budget's numbers, for operators and the remaining-budget header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetStatus {
    pub scope: String,
    /// The run id of a `run` budget's ledger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub period: Period,
    pub period_start: Option<String>,
    pub on_exceed: OnExceed,
    pub limit_usd: String,
    pub spent_usd: String,
    pub reserved_usd: String,
    pub remaining_usd: String,
}

impl Budget {
    fn leak(spec: &BudgetSpec, alerts: &AlertSink, now_us: i64) -> &'static Budget {
        Box::leak(Box::new(Budget::new(spec, alerts.clone(), now_us)))
    }

    fn new(spec: &BudgetSpec, alerts: AlertSink, now_us: i64) -> Budget {
        Budget {
            alerts,
            scope: spec.scope.clone(),
            period: spec.period,
            state: Mutex::new(BudgetState {
                limit: spec.limit,
                on_exceed: spec.on_exceed,
                main: Ledger::new(spec.period, now_us),
                runs: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `scope (period)`, or `run RUN (period)` for a run's ledger.
    pub fn subject(&self, key: &str) -> String {
        if key.is_empty() {
            format!("{} ({})", self.scope, self.period)
        } else {
            format!("run:{key} ({})", self.period)
        }
    }

    pub fn spec(&self) -> BudgetSpec {
        let state = self.lock();
        BudgetSpec {
            scope: self.scope.clone(),
            period: self.period,
            limit: state.limit,
            on_exceed: state.on_exceed,
        }
    }

    /// Sets the spend of a ledger from the store (at start).
    pub fn restore(&self, key: &str, spent: Usd, alerted_percents: &[u64], now_us: i64) {
        let mut state = self.lock();
        let ledger = state.ledger(self.period, key, now_us);
        ledger.spent = spent;
        for (i, pct) in THRESHOLDS.iter().enumerate() {
            if alerted_percents.contains(pct) {
                ledger.alerted |= 1 << i;
            }
        }
    }

    pub fn status(&self, now_us: i64) -> Vec<BudgetStatus> {
        let mut state = self.lock();
        let (limit, on_exceed, period) = (state.limit, state.on_exceed, self.period);
        let mut keys: Vec<String> = state.runs.keys().cloned().collect();
        keys.sort();
        let mut out = Vec::new();
        if self.scope != BudgetScope::Run {
            keys = vec![String::new()];
        }
        for key in keys {
            let ledger = *state.ledger(period, &key, now_us);
            out.push(BudgetStatus {
                scope: self.scope.to_string(),
                run: (!key.is_empty()).then_some(key),
                period,
                period_start: format_utc(ledger.start_us),
                on_exceed,
                limit_usd: limit.to_string(),
                spent_usd: ledger.spent.to_string(),
                reserved_usd: ledger.reserved.to_string(),
                remaining_usd: remaining(limit, &ledger).to_string(),
            });
        }
        out
    }

    /// A new limit can put spend past a threshold without any new call:
    /// those alerts are raised now.
    fn set(&self, spec: &BudgetSpec, now_us: i64) {
        let mut raised = Vec::new();
        {
            let mut state = self.lock();
            state.limit = spec.limit;
            state.on_exceed = spec.on_exceed;
            let keys: Vec<String> = if self.scope == BudgetScope::Run {
                state.runs.keys().cloned().collect()
            } else {
                vec![String::new()]
            };
            for key in keys {
                let ledger = state.ledger(self.period, &key, now_us);
                crossed(self, &key, ledger, spec.limit, &mut raised);
            }
        }
        for alert in raised {
            self.alerts.raise(alert);
        }
    }
}

fn remaining(limit: Usd, ledger: &Ledger) -> Usd {
    let left = limit - ledger.spent - ledger.reserved;
    left.max(Usd::ZERO)
}

/// Why a call was refused for money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRefusal {
    pub subject: String,
    pub limit: Usd,
    pub spent: Usd,
    pub reserved: Usd,
    pub asked: Usd,
    pub on_exceed: OnExceed,
}

impl BudgetRefusal {
    pub fn message(&self) -> String {
        let what = match self.on_exceed {
            OnExceed::RequireApproval => {
                " Over-budget calls of this scope need an operator's approval, which this Warden does not take yet."
            }
            OnExceed::Halt => " This budget halts its scope when exhausted.",
            _ => "",
        };
        format!(
            "budget {} is exhausted: spent ${} and ${} reserved by calls in flight, of a ${} limit; this call may cost up to ${}.{what} Ask an operator to raise it (`warden budgets set`).",
            self.subject, self.spent, self.reserved, self.limit, self.asked
        )
    }
}

struct Reservation {
    budget: &'static Budget,
    key: String,
    start_us: i64,
    amount: Usd,
}

/// The reservations of one admitted call. Dropping it unsettled releases
/// them: a call that never ran costs nothing.
#[derive(Default)]
pub struct BudgetHold {
    reservations: Vec<Reservation>,
}

impl std::fmt::Debug for BudgetHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetHold")
            .field("reservations", &self.reservations.len())
            .finish()
    }
}

impl BudgetHold {
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// Replaces each reservation with the exact cost. Returns the smallest
    /// remaining amount over the call's budgets.
    pub fn settle(mut self, cost: Usd, now_us: i64) -> Option<Usd> {
        let mut tightest: Option<Usd> = None;
        for r in std::mem::take(&mut self.reservations) {
            let mut raised = Vec::new();
            let mut state = r.budget.lock();
            let limit = state.limit;
            let period = r.budget.period;
            let ledger = state.ledger(period, &r.key, now_us);
            if ledger.start_us != r.start_us {
                // The period rolled while the call ran: it counts in the
                // period it started in, which is closed.
                continue;
            }
            ledger.reserved -= r.amount;
            ledger.spent += cost;
            if cost > r.amount {
                tracing::warn!(budget = %r.budget.subject(&r.key), reserved = %r.amount, billed = %cost, "a provider billed more than the call's upper bound");
                raised.push(Alert {
                    rule: "budget_overrun".into(),
                    severity: Severity::Critical,
                    subject: r.budget.subject(&r.key),
                    message: format!(
                        "a call cost ${cost}, more than the ${} it reserved (its upper bound); the budget's spend may pass its limit",
                        r.amount
                    ),
                });
            }
            crossed(r.budget, &r.key, ledger, limit, &mut raised);
            let left = remaining(limit, ledger);
            tightest = Some(tightest.map_or(left, |t| t.min(left)));
            drop(state);
            for alert in raised {
                r.budget.alerts.raise(alert);
            }
        }
        tightest
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        for r in self.reservations.drain(..) {
            let mut state = r.budget.lock();
            let ledger = state.ledger(r.budget.period, &r.key, r.start_us);
            if ledger.start_us == r.start_us {
                ledger.reserved -= r.amount;
            }
        }
    }
}

/// Marks the thresholds the ledger's spend has reached and not yet alerted.
fn crossed(budget: &Budget, key: &str, ledger: &mut Ledger, limit: Usd, raised: &mut Vec<Alert>) {
    for (i, pct) in THRESHOLDS.iter().enumerate() {
        let bit = 1u8 << i;
        if ledger.alerted & bit != 0 {
            continue;
        }
        if ledger.spent.times(100) >= limit.times(*pct) && ledger.spent > Usd::ZERO {
            ledger.alerted |= bit;
            raised.push(threshold_alert(budget, key, *pct, ledger.spent, limit));
        }
    }
}

fn threshold_alert(budget: &Budget, key: &str, pct: u64, spent: Usd, limit: Usd) -> Alert {
    Alert {
        rule: format!("budget_{pct}"),
        severity: match pct {
            100 => Severity::Critical,
            80 => Severity::Warning,
            _ => Severity::Info,
        },
        subject: budget.subject(key),
        message: format!(
            "budget {} has reached {pct}% of its limit: ${spent} of ${limit}",
            budget.subject(key)
        ),
    }
}

/// Every budget, swappable as a whole when an operator adds one.
pub struct BudgetBook {
    budgets: arc_swap::ArcSwap<Vec<&'static Budget>>,
    alerts: AlertSink,
    /// Serialises operators' changes (never the request path).
    edit: Mutex<()>,
}

impl BudgetBook {
    pub fn new(specs: &[BudgetSpec], alerts: AlertSink, now_us: i64) -> BudgetBook {
        let budgets = specs
            .iter()
            .map(|s| Budget::leak(s, &alerts, now_us))
            .collect();
        BudgetBook {
            budgets: arc_swap::ArcSwap::from_pointee(budgets),
            alerts,
            edit: Mutex::new(()),
        }
    }

    pub fn budgets(&self) -> Arc<Vec<&'static Budget>> {
        self.budgets.load_full()
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.load().is_empty()
    }

    /// Whether any budget counts this call (so its price must be known).
    pub fn applies_to(&self, call: &CallSubject<'_>) -> bool {
        self.budgets
            .load()
            .iter()
            .any(|b| b.scope.ledger_key(call).is_some())
    }

    /// Reserves `amount` in every budget that counts the call, or none.
    pub fn reserve(
        &self,
        call: &CallSubject<'_>,
        amount: Usd,
        now_us: i64,
    ) -> Result<BudgetHold, BudgetRefusal> {
        let budgets = self.budgets.load();
        let mut hold = BudgetHold {
            reservations: Vec::new(),
        };
        for budget in budgets.iter() {
            let Some(key) = budget.scope.ledger_key(call) else {
                continue;
            };
            let mut state = budget.lock();
            let (limit, on_exceed) = (state.limit, state.on_exceed);
            let ledger = state.ledger(budget.period, key, now_us);
            if on_exceed != OnExceed::Alert && ledger.spent + ledger.reserved + amount > limit {
                let refusal = BudgetRefusal {
                    subject: budget.subject(key),
                    limit,
                    spent: ledger.spent,
                    reserved: ledger.reserved,
                    asked: amount,
                    on_exceed,
                };
                // The budget is exhausted for calls like this one: that is
                // its 100 % alert, once per period.
                let exhausted = 1u8 << (THRESHOLDS.len() - 1);
                let alert = (ledger.alerted & exhausted == 0).then(|| {
                    ledger.alerted |= exhausted;
                    Alert {
                        rule: "budget_100".into(),
                        severity: Severity::Critical,
                        subject: budget.subject(key),
                        message: format!(
                            "budget {} is exhausted: a call was refused (spent ${}, reserved ${}, limit ${limit})",
                            budget.subject(key),
                            ledger.spent,
                            ledger.reserved
                        ),
                    }
                });
                drop(state);
                if let Some(alert) = alert {
                    self.alerts.raise(alert);
                }
                // `hold` drops here and releases what was reserved so far.
                return Err(refusal);
            }
            ledger.reserved += amount;
            let start_us = ledger.start_us;
            drop(state);
            hold.reservations.push(Reservation {
                budget,
                key: key.to_owned(),
                start_us,
                amount,
            });
        }
        Ok(hold)
    }

    /// Changes a budget's limit (and on_exceed), or adds the budget.
    /// Returns whether it was new.
    pub fn set(&self, spec: &BudgetSpec, now_us: i64) -> bool {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.budgets.load_full();
        if let Some(budget) = current
            .iter()
            .find(|b| b.scope == spec.scope && b.period == spec.period)
        {
            budget.set(spec, now_us);
            return false;
        }
        let mut next = current.as_ref().clone();
        next.push(Budget::leak(spec, &self.alerts, now_us));
        self.budgets.store(Arc::new(next));
        true
    }

    pub fn status(&self, now_us: i64) -> Vec<BudgetStatus> {
        self.budgets
            .load()
            .iter()
            .flat_map(|b| b.status(now_us))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000_000; // 2025-11-24T16:00:00Z

    fn usd(text: &str) -> Usd {
        Usd::parse(text).unwrap()
    }

    fn book(specs: &[(&str, &str, Period, OnExceed)]) -> (BudgetBook, crate::alerts::AlertInbox) {
        let (sink, inbox) = AlertSink::for_tests();
        let specs: Vec<_> = specs
            .iter()
            .map(|(scope, limit, period, on_exceed)| BudgetSpec {
                scope: BudgetScope::parse(scope).unwrap(),
                period: *period,
                limit: usd(limit),
                on_exceed: *on_exceed,
            })
            .collect();
        (BudgetBook::new(&specs, sink, NOW), inbox)
    }

    fn call<'a>(agent: &'a str, run: Option<&'a str>) -> CallSubject<'a> {
        CallSubject {
            agent,
            model: "gpt-4o",
            run_id: run,
            workflow: None,
        }
    }

    #[test]
    fn reservations_never_let_spend_pass_the_limit() {
        let (book, _inbox) = book(&[("global", "1", Period::Day, OnExceed::Deny)]);
        let holds: Vec<_> = (0..10)
            .map_while(|_| book.reserve(&call("a", None), usd("0.3"), NOW).ok())
            .collect();
        assert_eq!(holds.len(), 3, "three reservations of 0.30 fit in 1.00");
        let refusal = book.reserve(&call("a", None), usd("0.3"), NOW).unwrap_err();
        assert_eq!((refusal.spent, refusal.reserved), (Usd::ZERO, usd("0.9")));
        assert!(
            refusal.message().contains("global (day)"),
            "{}",
            refusal.message()
        );
        // Settling below the upper bound frees the difference.
        let mut holds = holds.into_iter();
        let left = holds.next().unwrap().settle(usd("0.1"), NOW).unwrap();
        assert_eq!(left, usd("0.3"));
        book.reserve(&call("a", None), usd("0.3"), NOW)
            .unwrap()
            .settle(usd("0.3"), NOW);
        // A call that never ran gives its reservation back.
        drop(holds);
        let status = &book.status(NOW)[0];
        assert_eq!(
            (status.spent_usd.as_str(), status.reserved_usd.as_str()),
            ("0.4", "0")
        );
    }

    #[test]
    fn all_budgets_must_admit_and_a_refusal_releases_the_others() {
        let (book, _inbox) = book(&[
            ("global", "10", Period::Month, OnExceed::Deny),
            ("agent:a", "1", Period::Day, OnExceed::Deny),
        ]);
        assert!(book.reserve(&call("a", None), usd("2"), NOW).is_err());
        let status = book.status(NOW);
        assert_eq!(
            status[0].reserved_usd, "0",
            "the global reservation was released"
        );
        book.reserve(&call("b", None), usd("2"), NOW)
            .unwrap()
            .settle(usd("2"), NOW);
        assert_eq!(book.status(NOW)[0].spent_usd, "2");
    }

    #[test]
    fn thresholds_alert_once_per_period_and_periods_roll() {
        let (book, inbox) = book(&[("agent:a", "1", Period::Hour, OnExceed::Deny)]);
        let spend = |amount: &str, at: i64| {
            book.reserve(&call("a", None), usd(amount), at)
                .unwrap()
                .settle(usd(amount), at)
        };
        spend("0.5", NOW);
        spend("0.1", NOW);
        spend("0.2", NOW);
        let rules: Vec<String> = inbox.drain().into_iter().map(|a| a.rule).collect();
        assert_eq!(rules, ["budget_50", "budget_80"]);
        assert!(book.reserve(&call("a", None), usd("0.3"), NOW).is_err());
        assert!(book.reserve(&call("a", None), usd("0.3"), NOW).is_err());
        let rules: Vec<String> = inbox.drain().into_iter().map(|a| a.rule).collect();
        assert_eq!(rules, ["budget_100"], "exhausted once, not per refusal");
        // The next hour starts from zero.
        let next_hour = NOW + 3_600_000_000;
        spend("0.3", next_hour);
        assert_eq!(book.status(next_hour)[0].spent_usd, "0.3");
    }

    #[test]
    fn alert_budgets_never_refuse_and_overruns_are_flagged() {
        let (book, inbox) = book(&[("global", "1", Period::Total, OnExceed::Alert)]);
        book.reserve(&call("a", None), usd("0.5"), NOW)
            .unwrap()
            .settle(usd("2"), NOW);
        book.reserve(&call("a", None), usd("5"), NOW).unwrap();
        let rules: Vec<String> = inbox.drain().into_iter().map(|a| a.rule).collect();
        assert!(rules.contains(&"budget_overrun".to_owned()), "{rules:?}");
        assert!(rules.contains(&"budget_100".to_owned()), "{rules:?}");
    }

    #[test]
    fn run_budgets_keep_one_ledger_per_run() {
        let (book, _inbox) = book(&[("run", "1", Period::Total, OnExceed::Deny)]);
        book.reserve(&call("a", Some("r1")), usd("1"), NOW)
            .unwrap()
            .settle(usd("1"), NOW);
        assert!(
            book.reserve(&call("a", Some("r1")), usd("0.1"), NOW)
                .is_err()
        );
        book.reserve(&call("a", Some("r2")), usd("0.1"), NOW)
            .unwrap();
        // Calls outside a run are not counted by run budgets.
        book.reserve(&call("a", None), usd("100"), NOW).unwrap();
        let status = book.status(NOW);
        assert_eq!(status.len(), 2);
        assert_eq!(status[0].run.as_deref(), Some("r1"));
    }

    #[test]
    fn a_budget_edited_at_runtime_applies_at_once() {
        let (book, inbox) = book(&[("agent:a", "1", Period::Day, OnExceed::Deny)]);
        book.reserve(&call("a", None), usd("1"), NOW)
            .unwrap()
            .settle(usd("1"), NOW);
        assert!(book.reserve(&call("a", None), usd("0.5"), NOW).is_err());
        let raised = BudgetSpec {
            scope: BudgetScope::Agent("a".into()),
            period: Period::Day,
            limit: usd("2"),
            on_exceed: OnExceed::Deny,
        };
        assert!(!book.set(&raised, NOW));
        book.reserve(&call("a", None), usd("0.5"), NOW).unwrap();
        // Lowering a limit under the spend raises the alerts it crossed.
        let model = |limit: &str| BudgetSpec {
            scope: BudgetScope::Model("gpt-*".into()),
            period: Period::Day,
            limit: usd(limit),
            on_exceed: OnExceed::Deny,
        };
        book.set(&model("10"), NOW);
        book.reserve(&call("b", None), usd("6"), NOW)
            .unwrap()
            .settle(usd("6"), NOW);
        inbox.drain();
        book.set(&model("7"), NOW);
        let rules: Vec<String> = inbox.drain().into_iter().map(|a| a.rule).collect();
        assert_eq!(
            rules,
            ["budget_80"],
            "50 % was alerted already, 100 % is not reached"
        );
        let added = BudgetSpec {
            period: Period::Month,
            ..raised
        };
        assert!(book.set(&added, NOW));
        assert_eq!(book.status(NOW).len(), 3);
    }
}
