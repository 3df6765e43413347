//! Money budgets that never overshoot.
//!
//! At admission a call reserves its upper-bound cost in every budget that
//! applies, all or none, each under that budget's own short lock (never held
//! across an await). When the call ends the reservation is replaced by the
//! exact cost, or released if it never ran. Spend passes a limit only when a
//! provider bills more than the upper bound; that is logged and alerted.

use crate::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::period::{Period, format_utc};
use super::scope::{BudgetScope, CallSubject};
use crate::alerts::{Alert, AlertSink, Severity};
use crate::money::Usd;
use crossbeam_utils::CachePadded;

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
    /// Handed to shards (allowance, and what they reserved and spent from
    /// it); only the main ledger leases.
    leased: Usd,
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
            leased: Usd::ZERO,
            alerted: 0,
        }
    }

    /// Starts a new period if `now_us` is past this one; says whether it did.
    fn roll(&mut self, period: Period, now_us: i64) -> bool {
        let rolled = now_us >= self.end_us;
        if rolled {
            *self = Ledger::new(period, now_us);
        }
        rolled
    }

    /// Spent, reserved and leased: what the limit must cover.
    fn committed(&self) -> Usd {
        self.spent + self.reserved + self.leased
    }
}

/// One worker's slice of a budget's main ledger: an allowance leased from
/// the budget, and what this worker's calls reserved and spent from it.
/// While a call fits the allowance, admission and settlement touch only
/// the shard, so workers serving the same agent do not contend (the
/// budget's own lock is taken to lease more, or when a threshold is near).
#[derive(Debug, Clone, Copy, Default)]
struct Shard {
    start_us: i64,
    end_us: i64,
    allowance: Usd,
    reserved: Usd,
    spent: Usd,
}

impl Shard {
    fn for_period(ledger: &Ledger) -> Shard {
        Shard {
            start_us: ledger.start_us,
            end_us: ledger.end_us,
            ..Shard::default()
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

/// Flags and figures read on every call and written rarely, kept on their
/// own cache line.
#[derive(Debug, Default)]
struct Hot {
    /// Two workers met on the budget's lock: from now on its main ledger
    /// is leased out to shards (like `LongAdder` growing cells).
    leasing: AtomicBool,
    /// The committed amount has reached a threshold not yet alerted: every
    /// settlement checks the exact spend.
    watch: AtomicBool,
    /// limit − committed, in whole nano-dollars, as of the last visit to
    /// the budget's lock; with a shard's allowance, the remaining amount a
    /// leased settlement reports.
    free_nanos: AtomicI64,
}

/// A budget lives for the rest of the process once made (at start or by an
/// operator): calls point at it without a shared reference count to bump.
pub struct Budget {
    pub scope: BudgetScope,
    pub period: Period,
    alerts: AlertSink,
    hot: CachePadded<Hot>,
    state: CachePadded<Mutex<BudgetState>>,
    shards: Box<[CachePadded<Mutex<Shard>>]>,
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

/// A ledger's exact spend and reservations, shards included, and the
/// allowance shards hold unused.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    spent: Usd,
    reserved: Usd,
    unused_allowance: Usd,
}

/// The shard of the calling thread: threads are dealt shards in turn, so
/// a pool's workers spread over them evenly.
fn shard_index(shards: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    MINE.with(|mine| *mine % shards)
}

fn shard_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .clamp(1, 64)
    })
}

impl Budget {
    fn leak(spec: &BudgetSpec, alerts: &AlertSink, now_us: i64) -> &'static Budget {
        Box::leak(Box::new(Budget::new(spec, alerts.clone(), now_us)))
    }

    fn new(spec: &BudgetSpec, alerts: AlertSink, now_us: i64) -> Budget {
        let main = Ledger::new(spec.period, now_us);
        let budget = Budget {
            alerts,
            scope: spec.scope.clone(),
            period: spec.period,
            hot: CachePadded::new(Hot::default()),
            state: CachePadded::new(Mutex::new(BudgetState {
                limit: spec.limit,
                on_exceed: spec.on_exceed,
                main,
                runs: HashMap::new(),
            })),
            shards: (0..shard_count())
                .map(|_| CachePadded::new(Mutex::new(Shard::for_period(&main))))
                .collect(),
        };
        budget.publish(&lock(&budget.state));
        budget
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        lock(&self.state)
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

    /// The ledger of `key`, rolled to the period of `now_us`. When the main
    /// ledger rolls, its shards start the new period empty.
    fn ledger<'s>(&self, state: &'s mut BudgetState, key: &str, now_us: i64) -> &'s mut Ledger {
        if key.is_empty() {
            if state.main.roll(self.period, now_us) {
                for shard in self.shards.iter() {
                    *lock(shard) = Shard::for_period(&state.main);
                }
            }
            return &mut state.main;
        }
        let period = self.period;
        let ledger = state
            .runs
            .entry(key.to_owned())
            .or_insert_with(|| Ledger::new(period, now_us));
        ledger.roll(period, now_us);
        ledger
    }

    /// Exact figures of a ledger, its shards' included (taken under the
    /// budget's lock; shards are locked after it, never the other way).
    fn totals(&self, state: &BudgetState, key: &str) -> Totals {
        let ledger = if key.is_empty() {
            &state.main
        } else {
            match state.runs.get(key) {
                Some(ledger) => ledger,
                None => return Totals::default(),
            }
        };
        let mut totals = Totals {
            spent: ledger.spent,
            reserved: ledger.reserved,
            unused_allowance: Usd::ZERO,
        };
        if key.is_empty() && ledger.leased > Usd::ZERO {
            for shard in self.shards.iter() {
                let shard = lock(shard);
                if shard.start_us == ledger.start_us {
                    totals.spent += shard.spent;
                    totals.reserved += shard.reserved;
                    totals.unused_allowance += shard.allowance;
                }
            }
        }
        totals
    }

    /// Takes every shard's unused allowance (but `except`'s, locked by the
    /// caller) back into the main ledger.
    fn reclaim(&self, state: &mut BudgetState, except: Option<usize>) {
        for (i, shard) in self.shards.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            let mut shard = lock(shard);
            if shard.start_us == state.main.start_us {
                state.main.leased -= shard.allowance;
                shard.allowance = Usd::ZERO;
            }
        }
    }

    /// Refreshes what calls read without the lock: whether a threshold is
    /// near and how much is free.
    fn publish(&self, state: &BudgetState) {
        let committed = state.main.committed();
        let near = THRESHOLDS.iter().enumerate().any(|(i, pct)| {
            state.main.alerted & (1 << i) == 0
                && committed > Usd::ZERO
                && committed.times(100) >= state.limit.times(*pct)
        });
        self.hot.watch.store(near, Ordering::SeqCst);
        let free = (state.limit - committed).max(Usd::ZERO);
        self.hot.free_nanos.store(free.nanos(), Ordering::Relaxed);
    }

    /// Sets the spend of a ledger from the store (at start).
    pub fn restore(&self, key: &str, spent: Usd, alerted_percents: &[u64], now_us: i64) {
        let mut state = self.lock();
        let ledger = self.ledger(&mut state, key, now_us);
        ledger.spent = spent;
        for (i, pct) in THRESHOLDS.iter().enumerate() {
            if alerted_percents.contains(pct) {
                ledger.alerted |= 1 << i;
            }
        }
        self.publish(&state);
    }

    pub fn status(&self, now_us: i64) -> Vec<BudgetStatus> {
        let mut keys: Vec<String> = if self.scope == BudgetScope::Run {
            self.lock().runs.keys().cloned().collect()
        } else {
            vec![String::new()]
        };
        keys.sort();
        keys.iter().map(|key| self.status_of(key, now_us)).collect()
    }

    /// One ledger's status.
    fn status_of(&self, key: &str, now_us: i64) -> BudgetStatus {
        let mut state = self.lock();
        let (limit, on_exceed, period) = (state.limit, state.on_exceed, self.period);
        let start_us = self.ledger(&mut state, key, now_us).start_us;
        let totals = self.totals(&state, key);
        BudgetStatus {
            scope: self.scope.to_string(),
            run: (!key.is_empty()).then(|| key.to_owned()),
            period,
            period_start: format_utc(start_us),
            on_exceed,
            limit_usd: limit.to_string(),
            spent_usd: totals.spent.to_string(),
            reserved_usd: totals.reserved.to_string(),
            remaining_usd: remaining(limit, &totals).to_string(),
        }
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
                self.ledger(&mut state, &key, now_us);
                self.check_thresholds(&mut state, &key, &mut raised);
            }
            self.publish(&state);
        }
        for alert in raised {
            self.alerts.raise(alert);
        }
    }

    /// Marks the thresholds the ledger's exact spend has reached and not
    /// yet alerted. Returns the ledger's totals.
    fn check_thresholds(
        &self,
        state: &mut BudgetState,
        key: &str,
        raised: &mut Vec<Alert>,
    ) -> Totals {
        let totals = self.totals(state, key);
        let limit = state.limit;
        let ledger = if key.is_empty() {
            &mut state.main
        } else {
            match state.runs.get_mut(key) {
                Some(ledger) => ledger,
                None => return totals,
            }
        };
        for (i, pct) in THRESHOLDS.iter().enumerate() {
            let bit = 1u8 << i;
            if ledger.alerted & bit != 0 {
                continue;
            }
            if totals.spent.times(100) >= limit.times(*pct) && totals.spent > Usd::ZERO {
                ledger.alerted |= bit;
                raised.push(threshold_alert(self, key, *pct, totals.spent, limit));
            }
        }
        totals
    }

    /// Reserves `amount` in the ledger of `key`: from this worker's shard
    /// when it holds enough allowance, otherwise under the budget's lock.
    fn reserve(
        &'static self,
        key: &str,
        amount: Usd,
        now_us: i64,
        over: &mut Option<BudgetRefusal>,
    ) -> Result<Reservation, Box<BudgetRefusal>> {
        let leasing = key.is_empty() && self.hot.leasing.load(Ordering::Relaxed);
        if leasing {
            let index = shard_index(self.shards.len());
            let mut shard = lock(&self.shards[index]);
            if now_us < shard.end_us && shard.allowance >= amount {
                shard.allowance -= amount;
                shard.reserved += amount;
                return Ok(Reservation {
                    budget: self,
                    key: String::new(),
                    start_us: shard.start_us,
                    amount,
                    shard: Some(index),
                });
            }
        }
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if key.is_empty() {
                    self.hot.leasing.store(true, Ordering::Relaxed);
                }
                self.lock()
            }
        };
        let leasing = key.is_empty() && self.hot.leasing.load(Ordering::Relaxed);
        let (limit, on_exceed) = (state.limit, state.on_exceed);
        let ledger = self.ledger(&mut state, key, now_us);
        let (start_us, committed) = (ledger.start_us, ledger.committed());
        // Shards are locked after the budget, never the other way round.
        let index = shard_index(self.shards.len());
        let mut shard = leasing.then(|| lock(&self.shards[index]));
        let held = shard.as_ref().map_or(Usd::ZERO, |s| s.allowance);
        let mut need = (amount - held).max(Usd::ZERO);
        let mut free = limit - committed;
        if on_exceed != OnExceed::Alert
            && free < need
            && key.is_empty()
            && state.main.leased > Usd::ZERO
        {
            // Not enough unleased: take back what other workers hold
            // unused, so a refusal means the budget itself is exhausted.
            if let Some(shard) = shard.as_mut() {
                state.main.leased -= shard.allowance;
                shard.allowance = Usd::ZERO;
            }
            self.reclaim(&mut state, Some(index));
            free = limit - state.main.committed();
            need = amount;
        }
        let mut exhausted_alert = None;
        if on_exceed != OnExceed::Alert && free < need {
            // `totals` locks every shard, this worker's too.
            let had_shard = shard.take().is_some();
            let totals = self.totals(&state, key);
            let refusal = BudgetRefusal {
                scope: self.scope.clone(),
                run: (!key.is_empty()).then(|| key.to_owned()),
                period: self.period,
                limit,
                spent: totals.spent,
                reserved: totals.reserved,
                asked: amount,
                on_exceed,
            };
            // The budget is exhausted for calls like this one: that is its
            // 100 % alert, once per period.
            let exhausted = 1u8 << (THRESHOLDS.len() - 1);
            let ledger = self.ledger(&mut state, key, now_us);
            exhausted_alert = (ledger.alerted & exhausted == 0).then(|| {
                ledger.alerted |= exhausted;
                Alert {
                    rule: "budget_100".into(),
                    severity: Severity::Critical,
                    subject: self.subject(key),
                    message: format!(
                        "budget {} is exhausted: a call was refused or held (spent ${}, reserved ${}, limit ${limit})",
                        self.subject(key),
                        totals.spent,
                        totals.reserved
                    ),
                }
            });
            if on_exceed == OnExceed::RequireApproval {
                // Reserved all the same: the call waits for an operator with
                // its cost held, and gives it back if it is not approved.
                *over = Some(refusal);
                shard = had_shard.then(|| lock(&self.shards[index]));
            } else {
                self.publish(&state);
                drop(state);
                if let Some(alert) = exhausted_alert {
                    self.alerts.raise(alert);
                }
                return Err(Box::new(refusal));
            }
        }
        let reservation = if let Some(mut shard) = shard {
            // Lease a slice of what is free, so the next calls on this
            // worker need not come back; slices shrink as the limit nears.
            let slice = free.max(Usd::ZERO).divided_by(4 * self.shards.len() as u64);
            let grant = need.max(slice);
            state.main.leased += grant;
            shard.allowance += grant;
            shard.allowance -= amount;
            shard.reserved += amount;
            Reservation {
                budget: self,
                key: String::new(),
                start_us,
                amount,
                shard: Some(index),
            }
        } else {
            self.ledger(&mut state, key, now_us).reserved += amount;
            Reservation {
                budget: self,
                key: key.to_owned(),
                start_us,
                amount,
                shard: None,
            }
        };
        self.publish(&state);
        drop(state);
        if let Some(alert) = exhausted_alert {
            self.alerts.raise(alert);
        }
        Ok(reservation)
    }

    /// Replaces a reservation with the call's exact cost; returns what is
    /// left of the budget (`None` when the period closed meanwhile).
    fn settle(
        &self,
        r: &Reservation,
        cost: Usd,
        now_us: i64,
        raised: &mut Vec<Alert>,
    ) -> Option<Usd> {
        let mut overrun_beyond_allowance = Usd::ZERO;
        if let Some(index) = r.shard {
            let mut shard = lock(&self.shards[index]);
            if shard.start_us != r.start_us {
                // The period rolled while the call ran: it counts in the
                // period it started in, which is closed.
                return None;
            }
            shard.reserved -= r.amount;
            shard.spent += cost;
            if cost <= r.amount {
                shard.allowance += r.amount - cost;
            } else {
                let extra = cost - r.amount;
                let covered = extra.min(shard.allowance);
                shard.allowance -= covered;
                overrun_beyond_allowance = extra - covered;
            }
            let allowance = shard.allowance;
            drop(shard);
            if cost <= r.amount && !self.hot.watch.load(Ordering::SeqCst) {
                let free = Usd::from_nanos(self.hot.free_nanos.load(Ordering::Relaxed));
                return Some(free + allowance);
            }
        }
        let mut state = self.lock();
        let limit = state.limit;
        let ledger = self.ledger(&mut state, &r.key, now_us);
        if ledger.start_us != r.start_us {
            return None;
        }
        if r.shard.is_some() {
            // Billed past the shard's allowance: the excess is spend the
            // budget did not lease out.
            ledger.leased += overrun_beyond_allowance;
        } else {
            ledger.reserved -= r.amount;
            ledger.spent += cost;
        }
        if cost > r.amount {
            tracing::warn!(budget = %self.subject(&r.key), reserved = %r.amount, billed = %cost, "a provider billed more than the call's upper bound");
            raised.push(Alert {
                rule: "budget_overrun".into(),
                severity: Severity::Critical,
                subject: self.subject(&r.key),
                message: format!(
                    "a call cost ${cost}, more than the ${} it reserved (its upper bound); the budget's spend may pass its limit",
                    r.amount
                ),
            });
        }
        let totals = self.check_thresholds(&mut state, &r.key, raised);
        self.publish(&state);
        Some(remaining(limit, &totals))
    }

    /// Gives back the reservation of a call that never ran.
    fn release(&self, r: &Reservation) {
        if let Some(index) = r.shard {
            let mut shard = lock(&self.shards[index]);
            if shard.start_us == r.start_us {
                shard.reserved -= r.amount;
                shard.allowance += r.amount;
            }
            return;
        }
        let mut state = self.lock();
        let ledger = self.ledger(&mut state, &r.key, r.start_us);
        if ledger.start_us == r.start_us {
            ledger.reserved -= r.amount;
        }
        self.publish(&state);
    }
}

fn remaining(limit: Usd, totals: &Totals) -> Usd {
    let left = limit - totals.spent - totals.reserved;
    left.max(Usd::ZERO)
}

/// Why a call was refused for money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRefusal {
    /// The budget's scope; for a `run` budget, `run` names the run.
    pub scope: BudgetScope,
    pub run: Option<String>,
    pub period: Period,
    pub limit: Usd,
    pub spent: Usd,
    pub reserved: Usd,
    pub asked: Usd,
    pub on_exceed: OnExceed,
}

impl BudgetRefusal {
    /// `agent:NAME`, `global`, … or `run:ID`: who a halt or an approval
    /// request is from (`budget:` + this).
    pub fn scope_text(&self) -> String {
        match &self.run {
            Some(run) => format!("run:{run}"),
            None => self.scope.to_string(),
        }
    }

    /// `scope (period)`, as budgets are named to operators.
    pub fn subject(&self) -> String {
        format!("{} ({})", self.scope_text(), self.period)
    }

    pub fn message(&self) -> String {
        let what = match self.on_exceed {
            OnExceed::RequireApproval => {
                " Over-budget calls of this scope need an operator's approval."
            }
            OnExceed::Halt => " This budget halts its scope when exhausted.",
            _ => "",
        };
        format!(
            "budget {} is exhausted: spent ${} and ${} reserved by calls in flight, of a ${} limit; this call may cost up to ${}.{what} Ask an operator to raise it (`warden budgets set`).",
            self.subject(),
            self.spent,
            self.reserved,
            self.limit,
            self.asked
        )
    }
}

struct Reservation {
    budget: &'static Budget,
    key: String,
    start_us: i64,
    amount: Usd,
    /// The shard it was reserved from, or `None` for the budget's ledger.
    shard: Option<usize>,
}

/// The reservations of one admitted call. Dropping it unsettled releases
/// them: a call that never ran costs nothing.
#[derive(Default)]
pub struct BudgetHold {
    reservations: Vec<Reservation>,
    /// An exhausted `on_exceed = "require_approval"` budget reserved the
    /// call anyway: it may go only once an operator approves.
    /// Boxed: rare, and large for every call's frame.
    pub needs_approval: Option<Box<BudgetRefusal>>,
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
            if let Some(left) = r.budget.settle(&r, cost, now_us, &mut raised) {
                tightest = Some(tightest.map_or(left, |t| t.min(left)));
            }
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
            r.budget.release(&r);
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
    ) -> Result<BudgetHold, Box<BudgetRefusal>> {
        let budgets = self.budgets.load();
        let mut hold = BudgetHold {
            reservations: Vec::new(),
            needs_approval: None,
        };
        for budget in budgets.iter() {
            let Some(key) = budget.scope.ledger_key(call) else {
                continue;
            };
            let mut over = None;
            // Exactly sized: a held call keeps its hold for minutes.
            if hold.reservations.capacity() == 0 {
                hold.reservations.reserve_exact(budgets.len());
            }
            // On a refusal `hold` drops and releases what was reserved so far.
            hold.reservations
                .push(budget.reserve(key, amount, now_us, &mut over)?);
            if hold.needs_approval.is_none() {
                hold.needs_approval = over.map(Box::new);
            }
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

    /// The status of the ledgers that count this call.
    pub fn status_for(&self, call: &CallSubject<'_>, now_us: i64) -> Vec<BudgetStatus> {
        self.budgets
            .load()
            .iter()
            .filter_map(|b| Some(b.status_of(b.scope.ledger_key(call)?, now_us)))
            .collect()
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

    /// Budgets whose workers have met on the lock lease to shards; every
    /// property above must hold there too.
    fn leasing(book: &BudgetBook) {
        for budget in book.budgets().iter() {
            budget.hot.leasing.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn leased_budgets_admit_exactly_what_fits_across_threads() {
        let (book, _inbox) = book(&[("agent:a", "1", Period::Day, OnExceed::Deny)]);
        leasing(&book);
        let book = Arc::new(book);
        let admitted: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    let book = book.clone();
                    scope.spawn(move || {
                        let mut admitted = 0;
                        while let Ok(hold) = book.reserve(&call("a", None), usd("0.01"), NOW) {
                            hold.settle(usd("0.01"), NOW);
                            admitted += 1;
                        }
                        admitted
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(admitted, 100, "allowance held by idle workers is reclaimed");
        let status = &book.status(NOW)[0];
        assert_eq!(
            (status.spent_usd.as_str(), status.reserved_usd.as_str()),
            ("1", "0")
        );
        let refusal = book
            .reserve(&call("a", None), usd("0.01"), NOW)
            .unwrap_err();
        assert_eq!((refusal.spent, refusal.reserved), (usd("1"), Usd::ZERO));
    }

    #[test]
    fn an_exhausted_approval_budget_holds_every_call_across_threads() {
        let (book, _inbox) = book(&[("agent:a", "0.05", Period::Day, OnExceed::RequireApproval)]);
        leasing(&book);
        let book = Arc::new(book);
        let asked: Vec<(usize, usize)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let book = book.clone();
                    scope.spawn(move || {
                        let (mut free, mut held) = (0, 0);
                        for _ in 0..50 {
                            let hold = book.reserve(&call("a", None), usd("0.01"), NOW).unwrap();
                            match hold.needs_approval {
                                Some(_) => held += 1,
                                None => free += 1,
                            }
                            // Held calls keep their reservation while they wait.
                            std::mem::forget(hold);
                        }
                        (free, held)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let free: usize = asked.iter().map(|(f, _)| f).sum();
        let held: usize = asked.iter().map(|(_, h)| h).sum();
        assert_eq!((free, held), (5, 195), "what fits goes, the rest waits");
    }

    #[test]
    fn leased_budgets_alert_at_each_threshold_and_release_and_roll() {
        let (book, inbox) = book(&[("global", "1", Period::Hour, OnExceed::Deny)]);
        leasing(&book);
        let mut rules_after = Vec::new();
        for _ in 0..10 {
            book.reserve(&call("a", None), usd("0.1"), NOW)
                .unwrap()
                .settle(usd("0.1"), NOW);
            rules_after.push(
                inbox
                    .drain()
                    .into_iter()
                    .map(|a| a.rule)
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(rules_after[4], ["budget_50"], "{rules_after:?}");
        assert_eq!(rules_after[7], ["budget_80"], "{rules_after:?}");
        assert_eq!(rules_after[9], ["budget_100"], "{rules_after:?}");
        assert_eq!(rules_after.iter().flatten().count(), 3, "{rules_after:?}");

        // A call that never ran gives its share back to the shard.
        let next_hour = NOW + 3_600_000_000;
        let held = book
            .reserve(&call("a", None), usd("0.7"), next_hour)
            .unwrap();
        assert_eq!(book.status(next_hour)[0].reserved_usd, "0.7");
        drop(held);
        let status = &book.status(next_hour)[0];
        assert_eq!(
            (
                status.spent_usd.as_str(),
                status.reserved_usd.as_str(),
                status.remaining_usd.as_str()
            ),
            ("0", "0", "1")
        );
        // A call settled after its period closed counts in neither period.
        let late = book
            .reserve(&call("a", None), usd("0.5"), next_hour)
            .unwrap();
        let two_hours = next_hour + 3_600_000_000;
        assert_eq!(late.settle(usd("0.5"), two_hours), None);
        assert_eq!(book.status(two_hours)[0].spent_usd, "0");
    }
}
