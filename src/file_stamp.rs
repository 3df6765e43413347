//! Noticing that a file changed (hot reload of modules and workflows):
//! its modification time and length, compared from one poll to the next.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    /// `None` when the file cannot be read (gone, or no permission).
    pub fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

/// Runs `check` (blocking file work) every `every` on the blocking pool
/// until the returned task is aborted.
pub fn poll_blocking<F>(
    every: Duration,
    what: &'static str,
    check: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() + Send + Sync + 'static,
{
    let check = Arc::new(check);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let check = check.clone();
            if tokio::task::spawn_blocking(move || check()).await.is_err() {
                tracing::error!("the {what} reload task panicked");
            }
        }
    })
}
