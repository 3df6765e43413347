//! The embedded DuckDB store: schema and migrations, the one writer, the
//! audit chain and read-only queries.

pub mod audit;
pub mod export;
pub mod ledger;
pub mod query;
pub mod record;
pub mod schema;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duckdb::Connection;

use crate::metrics::Metrics;
pub use record::{AuditEntry, CallRecord, Outcome, UsageSource};
pub use writer::{Recorder, WriterHandle};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store {path}: {message} (is another Warden running on it? stop it, or set [server] store to another file)"
    )]
    Open { path: PathBuf, message: String },
    #[error("cannot upgrade the store {path} to schema version {target}: {message}")]
    Migrate {
        path: PathBuf,
        target: i32,
        message: String,
    },
    #[error(
        "the store {path} has schema version {found}, newer than this Warden knows ({known}); upgrade Warden"
    )]
    TooNew {
        path: PathBuf,
        found: i32,
        known: i32,
    },
    #[error("cannot start the store writer: {0}")]
    Writer(String),
    #[error("store error: {0}")]
    Sql(String),
}

/// An open store file, migrated to the current schema.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |e: duckdb::Error| StoreError::Open {
            path: path.to_owned(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        let store = Store {
            conn,
            path: path.to_owned(),
        };
        store.migrate()?;
        // Operators' queries share this database: nothing may reach files,
        // other databases or extensions from it. One DuckDB thread: the
        // writer's (niced) thread does the store's work, instead of a pool
        // competing with the proxy workers for cores. (A 16 MB buffer pool
        // halves the writer's own memory in `cargo bench --bench store`, but
        // its spilling slows the writer by a quarter, records queue up in
        // Warden's heap instead and the p99 under load doubles: 64 MB.)
        store
            .conn
            .execute_batch(
                "SET threads = 1; SET memory_limit = '64MB'; SET enable_external_access = false; SET lock_configuration = true;",
            )
            .map_err(open_err)?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let known = schema::latest_version();
        let found = schema::current_version(&self.conn).map_err(|e| StoreError::Migrate {
            path: self.path.clone(),
            target: known,
            message: e.to_string(),
        })?;
        if found > known {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found,
                known,
            });
        }
        let applied = schema::migrate_to(&self.conn, known).map_err(|e| StoreError::Migrate {
            path: self.path.clone(),
            target: known,
            message: e.to_string(),
        })?;
        if !applied.is_empty() {
            tracing::info!(store = %self.path.display(), from = found, to = known, "store schema upgraded");
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i32, StoreError> {
        schema::current_version(&self.conn).map_err(|e| StoreError::Sql(e.to_string()))
    }

    pub fn query(
        &self,
        sql: &str,
        max_rows: usize,
    ) -> Result<query::QueryResult, query::QueryError> {
        query::run(&self.conn, sql, max_rows)
    }

    /// Starts the writer thread on its own connection and returns the handle
    /// for the request path, the writer to join at shutdown, and a reader for
    /// operators' queries.
    pub fn start(
        self,
        flush_interval: Duration,
        queue_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Recorder, WriterHandle, StoreReader), StoreError> {
        let writer_conn = self
            .conn
            .try_clone()
            .map_err(|e| StoreError::Writer(e.to_string()))?;
        let (recorder, handle) =
            writer::start(writer_conn, flush_interval, queue_capacity, metrics)
                .map_err(|e| StoreError::Writer(e.to_string()))?;
        Ok((
            recorder,
            handle,
            StoreReader {
                conn: Arc::new(Mutex::new(self.conn)),
            },
        ))
    }
}

/// Read access for operators while the writer runs.
#[derive(Clone)]
pub struct StoreReader {
    conn: Arc<Mutex<Connection>>,
}

impl StoreReader {
    /// A connection of its own for one query, so queries run side by side.
    fn connection(&self) -> Result<Connection, StoreError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        conn.try_clone().map_err(|e| StoreError::Sql(e.to_string()))
    }

    /// Runs a read-only query; blocking, so call it off the async executor.
    pub fn query(
        &self,
        sql: &str,
        max_rows: usize,
    ) -> Result<query::QueryResult, query::QueryError> {
        let conn = self
            .connection()
            .map_err(|e| query::QueryError::Sql(e.to_string()))?;
        query::run(&conn, sql, max_rows)
    }

    /// Runs `read` on a connection of its own; blocking.
    pub fn with_connection<T, E: From<StoreError>>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = self.connection()?;
        read(&conn)
    }

    pub fn export_audit(
        &self,
        format: export::ExportFormat,
        since: Option<&str>,
        until: Option<&str>,
    ) -> Result<Vec<u8>, StoreError> {
        export::export_audit(&self.connection()?, format, since, until)
    }

    pub fn verify_audit(&self) -> Result<audit::Verification, StoreError> {
        audit::verify(&self.connection()?).map_err(|e| StoreError::Sql(e.to_string()))
    }
}
