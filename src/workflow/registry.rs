//! The workflows in service: every `*.toml` in `[workflows] dir`, validated
//! at start and whenever a file changes. A file that fails validation is
//! refused (logged and audited, naming the file and line) and the previous
//! version of that workflow keeps serving. Each new definition text is
//! stored in `workflow_versions` with its content hash.

use crate::lock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::json;

use super::definition::{Definition, WorkflowAgents};
use crate::file_stamp::FileStamp;
use crate::store::record::{WorkflowVersionRow, now_micros};
use crate::store::{Recorder, StoreReader};

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
    /// Every definition seen or read back, by version hash.
    by_hash: Mutex<HashMap<String, Arc<Definition>>>,
    reader: Option<StoreReader>,
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
        reader: Option<StoreReader>,
        recorder: Recorder,
    ) -> WorkflowSet {
        let set = WorkflowSet {
            dir,
            agents,
            current: ArcSwap::from_pointee(BTreeMap::new()),
            files: Mutex::new(HashMap::new()),
            known_versions: Mutex::new(known_versions),
            by_hash: Mutex::new(HashMap::new()),
            reader,
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

    /// The version in service.
    pub fn current(&self, name: &str) -> Option<Arc<Definition>> {
        self.current
            .load()
            .get(name)
            .map(|served| served.definition.clone())
    }

    pub fn names(&self) -> Vec<String> {
        self.current.load().keys().cloned().collect()
    }

    /// A version of a workflow by its hash (a unique prefix of at least 8
    /// characters will do): one seen by this process, or read back from
    /// `workflow_versions`. Blocking: may read the store.
    pub fn version(&self, name: &str, hash: &str) -> Option<Arc<Definition>> {
        let matches =
            |d: &Definition| d.name == name && d.hash.starts_with(hash) && hash.len() >= 8;
        if let Some(found) = lock(&self.by_hash).values().find(|d| matches(d)) {
            return Some(found.clone());
        }
        let reader = self.reader.as_ref()?;
        let rows: Vec<(String, String, String)> = reader
            .with_connection(|conn| {
                let mut stmt = conn
                    .prepare("SELECT version_hash, definition, coalesce(source, '') FROM workflow_versions WHERE workflow = ? AND starts_with(version_hash, ?)")
                    .map_err(|e| crate::store::StoreError::Sql(e.to_string()))?;
                let rows = stmt
                    .query_map(duckdb::params![name, hash], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| crate::store::StoreError::Sql(e.to_string()))?;
                Ok::<_, crate::store::StoreError>(rows)
            })
            .ok()?;
        let [(_, text, source)] = rows.as_slice() else {
            return None;
        };
        // Agents are not checked again: a version stays runnable as it was
        // validated when it was loaded.
        let definition = Definition::parse(text, Path::new(source), &WorkflowAgents::default())
            .map_err(|e| tracing::error!(workflow = name, error = %e, "a stored workflow version no longer parses"))
            .ok()?;
        let definition = Arc::new(definition);
        lock(&self.by_hash).insert(definition.hash.clone(), definition.clone());
        Some(definition)
    }

    /// `warden workflows rollback`: an older version becomes current (until
    /// its file changes again). Returns it and the version it replaced.
    /// Blocking: may read the store.
    pub fn pin(
        &self,
        name: &str,
        hash: &str,
        by: &str,
    ) -> Result<(Arc<Definition>, Option<String>), super::RunsError> {
        let definition =
            self.version(name, hash)
                .ok_or_else(|| super::RunsError::UnknownVersion {
                    workflow: name.to_owned(),
                    hash: hash.to_owned(),
                })?;
        let previous = self.make_current(definition.clone());
        self.recorder.workflow_pin(name, &definition.hash, by);
        self.recorder.audit(
            by,
            "workflow_rollback",
            Some(name),
            json!({"version_hash": definition.hash, "previous": previous}),
        );
        tracing::info!(
            workflow = name,
            version = crate::short_hash(&definition.hash),
            by,
            "workflow rolled back"
        );
        Ok((definition, previous))
    }

    /// At start: a rollback made after the file's version was first loaded
    /// still stands; a file edited since then wins.
    pub fn apply_pins(&self, conn: &duckdb::Connection) -> duckdb::Result<()> {
        for (name, hash, pinned_at) in super::store::latest_pins(conn)? {
            let Some(current) = self.current(&name) else {
                continue;
            };
            if current.hash == hash {
                continue;
            }
            let file_since = super::store::first_loaded(conn, &current.hash)?.unwrap_or(i64::MAX);
            if file_since < pinned_at
                && let Some(definition) = self.version(&name, &hash)
            {
                tracing::info!(
                    workflow = name,
                    version = crate::short_hash(&hash),
                    "workflow stays rolled back to an older version"
                );
                self.make_current(definition);
            }
        }
        Ok(())
    }

    /// Serves `definition` for its workflow; returns the hash it replaced.
    fn make_current(&self, definition: Arc<Definition>) -> Option<String> {
        let mut next = (**self.current.load()).clone();
        let file = next
            .get(&definition.name)
            .map(|s| s.file.clone())
            .unwrap_or_default();
        let previous = next
            .insert(
                definition.name.clone(),
                Arc::new(Served { definition, file }),
            )
            .map(|s| s.definition.hash.clone());
        self.current.store(Arc::new(next));
        previous
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
                lock(&self.by_hash).insert(definition.hash.clone(), definition.clone());
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
                tracing::info!(workflow = %definition.name, version = crate::short_hash(&definition.hash), file = %source, "workflow loaded");
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
