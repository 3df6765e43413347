//! Live events for operators: approvals requested and decided, halts and
//! resumes, budget alerts, policy denials and refused calls, fanned out to
//! every `GET /admin/v1/events` stream (and so to `warden watch`).
//!
//! Publishing never waits: with nobody watching it is one atomic load; with
//! watchers it is a broadcast send. A watcher that falls behind loses the
//! oldest events and is told how many.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::store::record::now_micros;

/// Events a slow watcher may fall behind by before it loses some.
const BACKLOG: usize = 4_096;

/// An event as watchers receive it: what happened, and when.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Microseconds since the epoch.
    pub ts_us: i64,
    #[serde(flatten)]
    pub what: EventParts,
}

/// The event kinds, as `warden watch --kind` takes them.
pub const KINDS: &[&str] = &[
    "approval_requested",
    "approval_decided",
    "halt",
    "resume",
    "budget_alert",
    "policy_deny",
    "call_refused",
    "run_started",
    "run_ended",
    "step_changed",
];

#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<Arc<Event>>,
    watchers: AtomicUsize,
}

impl Default for EventBus {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        EventBus {
            inner: Arc::new(Inner {
                tx,
                watchers: AtomicUsize::new(0),
            }),
        }
    }
}

impl EventBus {
    pub fn is_watched(&self) -> bool {
        self.inner.watchers.load(Ordering::Relaxed) > 0
    }

    /// Publishes an event; `build` runs only when somebody is watching.
    pub fn publish(&self, build: impl FnOnce() -> EventParts) {
        if !self.is_watched() {
            return;
        }
        let _ = self.inner.tx.send(Arc::new(Event {
            ts_us: now_micros(),
            what: build(),
        }));
    }

    pub fn subscribe(&self) -> Watcher {
        self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        Watcher {
            rx: self.inner.tx.subscribe(),
            bus: self.inner.clone(),
        }
    }
}

/// What a publisher says; the bus stamps the time.
#[derive(Debug, Clone, Serialize)]
pub struct EventParts {
    pub kind: &'static str,
    /// Who caused it: an operator, `policy:NAME`, `budget:SCOPE`, `warden`.
    pub actor: String,
    pub subject: Option<String>,
    /// One readable line.
    pub message: String,
    pub data: serde_json::Value,
}

pub struct Watcher {
    rx: broadcast::Receiver<Arc<Event>>,
    bus: Arc<Inner>,
}

pub enum Received {
    Event(Arc<Event>),
    /// The watcher fell behind and this many events were lost.
    Lagged(u64),
    Closed,
}

impl Watcher {
    pub async fn next(&mut self) -> Received {
        match self.rx.recv().await {
            Ok(event) => Received::Event(event),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Lagged(n),
            Err(broadcast::error::RecvError::Closed) => Received::Closed,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.bus.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_reach_watchers_and_cost_nothing_without_them() {
        let bus = EventBus::default();
        let mut built = false;
        bus.publish(|| {
            built = true;
            EventParts {
                kind: "halt",
                actor: "op".into(),
                subject: None,
                message: String::new(),
                data: serde_json::Value::Null,
            }
        });
        assert!(!built, "no watcher: the event is not even built");
        let mut watcher = bus.subscribe();
        bus.publish(|| EventParts {
            kind: "resume",
            actor: "op".into(),
            subject: Some("agent:a".into()),
            message: "resumed".into(),
            data: serde_json::Value::Null,
        });
        match watcher.next().await {
            Received::Event(event) => assert_eq!(event.what.kind, "resume"),
            _ => panic!("expected the event"),
        }
        drop(watcher);
        assert!(!bus.is_watched());
    }
}
