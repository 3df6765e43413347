//! The workflows in service: every `*.toml` in `[workflows] dir`, validated
//! at start and whenever a file changes. A file that fails validation is
//! refused (logged and audited, naming the file and line) and the previous
//! version of that workflow keeps serving. Each new definition text is
//! stored in `workflow_versions` with its content hash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::json;

use super::definition::{Definition, WorkflowAgents};
use crate::file_stamp::FileStamp;
use crate::store::Recorder;
use crate::store::record::{WorkflowVersionRow, now_micros};

/// A workflow as `warden workflows list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowSummary {
    pub name: String,
    pub version_hash: String,
    pub description: String,
    pub steps: usize,
    pub file: String,
}

pub struct WorkflowSet {
    dir: Option<PathBuf>,
    agents: WorkflowAgents,
    current: ArcSwap<BTreeMap<String, Arc<Served>>>,
    /// Files as last seen by the poller, and the workflow each defined.
    files: Mutex<HashMap<PathBuf, Option<FileStamp>>>,
    known_versions: Mutex<HashSet<String>>,
    recorder: Recorder,
}

pub struct Served {
    pub definition: Arc<Definition>,
    pub file: PathBuf,
}

impl WorkflowSet {
    /// Loads every workflow file of `dir` (none without a dir).
    /// `known_versions` are the hashes the store already holds.
    pub fn load(
        dir: Option<PathBuf>,
        agents: WorkflowAgents,
        known_versions: HashSet<String>,
        recorder: Recorder,
    ) -> WorkflowSet {
        let set = WorkflowSet {
            dir,
            agents,
            current: ArcSwap::from_pointee(BTreeMap::new()),
            files: Mutex::new(HashMap::new()),
            known_versions: Mutex::new(known_versions),
            recorder,
        };
        set.reload_changed();
        set
    }

    pub fn list(&self) -> Vec<WorkflowSummary> {
        self.current
            .load()
            .values()
            .map(|served| WorkflowSummary {
                name: served.definition.name.clone(),
                version_hash: served.definition.hash.clone(),
                description: served.definition.description.clone(),
                steps: served.definition.steps.len(),
                file: served.file.display().to_string(),
            })
            .collect()
    }

    /// Looks at every file of the directory and (re)loads those that are
    /// new or changed. Blocking: file reads.
    pub fn reload_changed(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the workflows directory");
                return;
            }
        };
        paths.sort();
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        for path in paths {
            let stamp = FileStamp::of(&path);
            if files.get(&path) == Some(&stamp) {
                continue;
            }
            files.insert(path.clone(), stamp);
            self.load_file(&path);
        }
    }

    fn load_file(&self, path: &Path) {
        let source = path.display().to_string();
        match Definition::load(path, &self.agents) {
            Ok(definition) => {
                let definition = Arc::new(definition);
                let mut next = (**self.current.load()).clone();
                if let Some(other) = next.get(&definition.name)
                    && other.file != path
                {
                    self.refuse(
                        path,
                        &format!(
                            "{source}: workflow `{}` is already defined by {}; workflow names must be unique",
                            definition.name,
                            other.file.display()
                        ),
                    );
                    return;
                }
                let previous = next
                    .get(&definition.name)
                    .map(|s| s.definition.hash.clone());
                if previous.as_deref() == Some(definition.hash.as_str()) {
                    return;
                }
                let new_version = self
                    .known_versions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(definition.hash.clone());
                if new_version {
                    self.recorder.workflow_version(WorkflowVersionRow {
                        workflow: definition.name.clone(),
                        version_hash: definition.hash.clone(),
                        definition: definition.text.clone(),
                        source: source.clone(),
                        loaded_at_us: now_micros(),
                        loaded_by: "file".into(),
                    });
                }
                self.recorder.audit(
                    "warden",
                    "workflow_loaded",
                    Some(&definition.name),
                    json!({"version_hash": definition.hash, "previous": previous, "file": source, "steps": definition.steps.len()}),
                );
                tracing::info!(workflow = %definition.name, version = &definition.hash[..12], file = %source, "workflow loaded");
                next.insert(
                    definition.name.clone(),
                    Arc::new(Served {
                        definition,
                        file: path.to_owned(),
                    }),
                );
                self.current.store(Arc::new(next));
            }
            Err(e) => self.refuse(path, &e.to_string()),
        }
    }

    fn refuse(&self, path: &Path, error: &str) {
        tracing::error!(file = %path.display(), "workflow refused: {error}; the previous version (if any) keeps serving");
        self.recorder.audit(
            "warden",
            "workflow_refused",
            Some(&path.display().to_string()),
            json!({"error": error}),
        );
    }

    /// Polls the directory for changes until the task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.dir.as_ref()?;
        let set = self.clone();
        Some(crate::file_stamp::poll_blocking(
            every,
            "workflow",
            move || set.reload_changed(),
        ))
    }
}

/// The workflow versions the store already holds.
pub fn known_versions(conn: &duckdb::Connection) -> duckdb::Result<HashSet<String>> {
    let mut stmt = conn.prepare("SELECT DISTINCT version_hash FROM workflow_versions")?;
    let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
    rows.collect()
}
