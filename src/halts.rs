//! Halts: an operator (or a policy, or a budget) stops an agent, a run or
//! everything. New calls in scope are refused; an immediate halt also cuts
//! the scope's in-flight calls, which notice within one wakeup.
//!
//! The request path pays one atomic load while nothing is halted. In-flight
//! calls register their task's waker once with their worker's slot table;
//! a halt bumps the epoch and wakes every registered call, and each checks
//! whether the new halt covers it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwap;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HaltScope {
    All,
    Agent(String),
    Run(String),
}

impl HaltScope {
    /// `all`, `agent:NAME` or `run:ID`.
    pub fn parse(text: &str) -> Result<HaltScope, String> {
        let text = text.trim();
        if text == "all" {
            return Ok(HaltScope::All);
        }
        let bad = || format!("halt scope `{text}` is not `all`, `agent:NAME` or `run:ID`");
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        let name = name.trim();
        if name.is_empty() {
            return Err(bad());
        }
        match kind {
            "agent" => Ok(HaltScope::Agent(name.to_owned())),
            "run" => Ok(HaltScope::Run(name.to_owned())),
            _ => Err(bad()),
        }
    }

    pub fn covers(&self, agent: &str, run: Option<&str>) -> bool {
        match self {
            HaltScope::All => true,
            HaltScope::Agent(name) => name == agent,
            HaltScope::Run(id) => run == Some(id.as_str()),
        }
    }
}

impl std::fmt::Display for HaltScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaltScope::All => f.write_str("all"),
            HaltScope::Agent(name) => write!(f, "agent:{name}"),
            HaltScope::Run(id) => write!(f, "run:{id}"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Halt {
    pub halt_id: String,
    #[serde(serialize_with = "scope_text")]
    pub scope: HaltScope,
    /// New calls refused, in-flight ones left to finish.
    pub drain: bool,
    pub reason: String,
    /// An operator's name, `policy:NAME` or `budget:SCOPE`.
    pub by: String,
    pub since_us: i64,
}

fn scope_text<S: serde::Serializer>(scope: &HaltScope, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(scope)
}

impl Halt {
    /// The message a refused or cut call carries.
    pub fn message(&self) -> String {
        let what = match &self.scope {
            HaltScope::All => "all agents are halted".to_owned(),
            HaltScope::Agent(name) => format!("agent `{name}` is halted"),
            HaltScope::Run(id) => format!("run `{id}` is halted"),
        };
        format!(
            "{what} by {} ({}): {}. An operator lifts it with `warden resume`.",
            self.by,
            if self.drain { "drain" } else { "immediate" },
            self.reason
        )
    }
}

/// A halt refused because its scope is halted already: the halt in force.
#[derive(Debug, thiserror::Error)]
#[error("{} is already halted by {}: {}", .0.scope, .0.by, .0.reason)]
pub struct AlreadyHalted(pub Arc<Halt>);

/// A resume of a scope that is not halted.
#[derive(Debug, thiserror::Error)]
#[error("{0} is not halted")]
pub struct NotHalted(pub String);

/// The active halts, shared by every worker and the admin API.
pub struct Halts {
    active: ArcSwap<Vec<Arc<Halt>>>,
    any: AtomicBool,
    /// Bumped by every new halt, before the wakeups.
    epoch: AtomicU64,
    workers: Mutex<Vec<Arc<WakerSlots>>>,
    edit: Mutex<()>,
}

impl Default for Halts {
    fn default() -> Self {
        Halts::new(Vec::new())
    }
}

impl Halts {
    pub fn new(active: Vec<Halt>) -> Halts {
        let any = !active.is_empty();
        Halts {
            active: ArcSwap::from_pointee(active.into_iter().map(Arc::new).collect()),
            any: AtomicBool::new(any),
            epoch: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
            edit: Mutex::new(()),
        }
    }

    /// The halt that refuses a new call of this agent and run, if any.
    pub fn refusing(&self, agent: &str, run: Option<&str>) -> Option<Arc<Halt>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.active
            .load()
            .iter()
            .find(|h| h.scope.covers(agent, run))
            .cloned()
    }

    /// The immediate halt that cuts an in-flight call, if any.
    pub fn cutting(&self, agent: &str, run: Option<&str>) -> Option<Arc<Halt>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.active
            .load()
            .iter()
            .find(|h| !h.drain && h.scope.covers(agent, run))
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<Halt>> {
        self.active.load().iter().cloned().collect()
    }

    /// Adds a halt and wakes every in-flight call to check it. A drain halt
    /// on a scope already drained may be made immediate; anything else on a
    /// halted scope is refused, naming who halted it.
    pub fn halt(&self, halt: Halt) -> Result<Arc<Halt>, AlreadyHalted> {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.active.load_full();
        let mut next: Vec<Arc<Halt>> = Vec::with_capacity(current.len() + 1);
        for existing in current.iter() {
            if existing.scope == halt.scope {
                if existing.drain && !halt.drain {
                    continue;
                }
                return Err(AlreadyHalted(existing.clone()));
            }
            next.push(existing.clone());
        }
        let halt = Arc::new(halt);
        next.push(halt.clone());
        self.active.store(Arc::new(next));
        self.any.store(true, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.wake_all();
        Ok(halt)
    }

    /// Lifts the halt on exactly this scope.
    pub fn resume(&self, scope: &HaltScope) -> Result<Arc<Halt>, NotHalted> {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.active.load_full();
        let Some(lifted) = current.iter().find(|h| h.scope == *scope).cloned() else {
            return Err(NotHalted(scope.to_string()));
        };
        let next: Vec<Arc<Halt>> = current
            .iter()
            .filter(|h| h.scope != *scope)
            .cloned()
            .collect();
        self.any.store(!next.is_empty(), Ordering::Release);
        self.active.store(Arc::new(next));
        Ok(lifted)
    }

    /// A slot table for one proxy worker's in-flight calls.
    pub fn worker_slots(self: &Arc<Self>) -> Arc<WakerSlots> {
        let slots = Arc::new(WakerSlots::default());
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slots.clone());
        slots
    }

    /// A call's watch for halts, registered on first poll.
    pub fn watch(self: &Arc<Self>, slots: &Arc<WakerSlots>) -> HaltWatch {
        HaltWatch {
            halts: self.clone(),
            slots: slots.clone(),
            slot: None,
            seen_epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    fn wake_all(&self) {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for slots in workers {
            slots.wake_all();
        }
    }
}

/// One worker's registered in-flight calls: their task wakers.
#[derive(Default)]
pub struct WakerSlots {
    inner: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl WakerSlots {
    fn insert(&self, waker: Waker) -> usize {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match table.free.pop() {
            Some(index) => {
                table.wakers[index] = Some(waker);
                index
            }
            None => {
                table.wakers.push(Some(waker));
                table.wakers.len() - 1
            }
        }
    }

    fn replace(&self, index: usize, waker: Waker) {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table.wakers[index] = Some(waker);
    }

    fn remove(&self, index: usize) {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table.wakers[index] = None;
        table.free.push(index);
    }

    fn wake_all(&self) {
        let table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for waker in table.wakers.iter().flatten() {
            waker.wake_by_ref();
        }
    }

    /// Calls registered now.
    pub fn len(&self) -> usize {
        let table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table.wakers.len() - table.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An in-flight call's view of the halts: polled alongside whatever the
/// call waits on, ready with the halt that cuts it.
pub struct HaltWatch {
    halts: Arc<Halts>,
    slots: Arc<WakerSlots>,
    slot: Option<(usize, Waker)>,
    seen_epoch: u64,
}

impl HaltWatch {
    /// Ready when an immediate halt covers this agent and run.
    pub fn poll_cut(
        &mut self,
        cx: &mut Context<'_>,
        agent: &str,
        run: Option<&str>,
    ) -> Poll<Arc<Halt>> {
        // Register first, then read the epoch: a halt that bumps it after
        // the read wakes the registered waker.
        match &self.slot {
            Some((_, waker)) if waker.will_wake(cx.waker()) => {}
            Some((index, _)) => {
                let index = *index;
                self.slots.replace(index, cx.waker().clone());
                self.slot = Some((index, cx.waker().clone()));
            }
            None => {
                let index = self.slots.insert(cx.waker().clone());
                self.slot = Some((index, cx.waker().clone()));
            }
        }
        let epoch = self.halts.epoch.load(Ordering::SeqCst);
        if epoch == self.seen_epoch {
            return Poll::Pending;
        }
        self.seen_epoch = epoch;
        match self.halts.cutting(agent, run) {
            Some(halt) => Poll::Ready(halt),
            None => Poll::Pending,
        }
    }

    /// Waits for the halt that cuts this call; pair it with the call's work
    /// in a `select!`.
    pub async fn cut(&mut self, agent: &str, run: Option<&str>) -> Arc<Halt> {
        std::future::poll_fn(|cx| self.poll_cut(cx, agent, run)).await
    }
}

impl Drop for HaltWatch {
    fn drop(&mut self) {
        if let Some((index, _)) = self.slot.take() {
            self.slots.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halt(scope: &str, drain: bool) -> Halt {
        Halt {
            halt_id: "h".into(),
            scope: HaltScope::parse(scope).unwrap(),
            drain,
            reason: "runaway".into(),
            by: "alice".into(),
            since_us: 0,
        }
    }

    #[test]
    fn scopes_parse_and_cover() {
        assert_eq!(HaltScope::parse("all").unwrap(), HaltScope::All);
        assert!(HaltScope::parse("agent:").is_err());
        assert!(HaltScope::parse("team:x").is_err());
        let run = HaltScope::parse("run:r1").unwrap();
        assert!(run.covers("a", Some("r1")) && !run.covers("a", None));
        assert!(HaltScope::parse("agent:a").unwrap().covers("a", Some("r9")));
    }

    #[test]
    fn drain_refuses_new_calls_but_cuts_nothing() {
        let halts = Halts::default();
        assert!(halts.refusing("a", None).is_none());
        halts.halt(halt("agent:a", true)).unwrap();
        assert!(halts.refusing("a", None).is_some());
        assert!(halts.cutting("a", None).is_none());
        assert!(halts.refusing("b", None).is_none());
        // Made immediate; a second immediate halt on the scope is refused.
        halts.halt(halt("agent:a", false)).unwrap();
        assert!(halts.cutting("a", None).is_some());
        assert!(matches!(
            halts.halt(halt("agent:a", false)),
            Err(AlreadyHalted(_))
        ));
        halts.resume(&HaltScope::Agent("a".into())).unwrap();
        assert!(halts.refusing("a", None).is_none());
        assert!(halts.resume(&HaltScope::Agent("a".into())).is_err());
    }

    #[tokio::test]
    async fn a_halt_wakes_the_calls_it_covers_and_only_those() {
        let halts = Arc::new(Halts::default());
        let slots = halts.worker_slots();
        let mut covered = halts.watch(&slots);
        let mut other = halts.watch(&slots);
        let cut = tokio::spawn(async move { covered.cut("a", None).await });
        let spared = tokio::spawn(async move {
            tokio::time::timeout(std::time::Duration::from_millis(200), other.cut("b", None))
                .await
                .is_err()
        });
        // Both are registered before the halt.
        while slots.len() < 2 {
            tokio::task::yield_now().await;
        }
        halts.halt(halt("agent:a", false)).unwrap();
        assert_eq!(cut.await.unwrap().reason, "runaway");
        assert!(spared.await.unwrap(), "agent b's call is not cut");
        assert!(slots.is_empty(), "dropped watches leave their slots");
    }
}
