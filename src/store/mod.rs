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
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Rows per row group of the tables Warden writes (DuckDB's default is
/// 122,880). A commit that brings at least one whole row group is written
/// to the file as compressed row groups directly, rather than into the WAL
/// and then again, recompressed, at every checkpoint: the writer commits call
/// records in batches of this size under load (`writer::MAX_BATCH`), which
/// takes its CPU per row from 5.9 to 3.9 µs and its peak memory down by a
/// quarter (`cargo bench --bench store`). Applies to row groups written from
/// now on; files written before keep theirs, and any DuckDB reads both.
pub const ROW_GROUP_ROWS: usize = 4096;

/// The catalog name the store file is attached under.
const CATALOG: &str = "store";

/// An open store file, migrated to the current schema.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// DuckDB's buffer pool when `[server] store_memory_mb` is not set: about
/// that much of Warden's RSS under load is blocks DuckDB has just written
/// and keeps cached.
pub const DEFAULT_MEMORY_MB: u32 = 24;

/// The least buffer pool Warden accepts. While commits under load went
/// through the WAL, a checkpoint at 16 MB and 40,000 rows/s ran out of
/// memory and DuckDB invalidated the database; now that busy commits write
/// whole row groups, 16 MB holds from 5,000 to 80,000 rows/s (`MEMORY_MB=16
/// RATE=80000 ROWS=1600000 cargo bench --bench store`). Less is untested.
pub const MIN_MEMORY_MB: u32 = 16;

/// A path as the text of a SQL string literal.
fn sql_text(path: &Path) -> String {
    path.display().to_string().replace('\'', "''")
}

fn attach_sql(path: &Path) -> String {
    format!(
        "ATTACH '{}' AS {CATALOG} (ROW_GROUP_SIZE {ROW_GROUP_ROWS}); USE {CATALOG};",
        sql_text(path)
    )
}

/// Another connection to the store file (every connection starts in the
/// in-memory catalog the file is attached to).
fn connect(conn: &Connection) -> duckdb::Result<Connection> {
    let other = conn.try_clone()?;
    other.execute_batch(&format!("USE {CATALOG}"))?;
    Ok(other)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_memory(path, DEFAULT_MEMORY_MB)
    }

    /// Opens the store with DuckDB's buffer pool capped at `memory_mb`: the
    /// blocks the writer has just written stay cached up to that cap, so it
    /// is most of the store's share of Warden's RSS.
    pub fn open_with_memory(path: &Path, memory_mb: u32) -> Result<Store, StoreError> {
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
        // Attached rather than opened, because the row group size is an
        // option of ATTACH only.
        let conn = Connection::open_in_memory().map_err(open_err)?;
        conn.execute_batch(&attach_sql(path)).map_err(open_err)?;
        let store = Store {
            conn,
            path: path.to_owned(),
        };
        store.migrate()?;
        // Operators' queries share this database: nothing may reach files,
        // other databases or extensions from it. One DuckDB thread: the
        // writer's thread does the store's work, instead of a pool
        // competing with the proxy workers for cores. The buffer pool is
        // `memory_mb` (24 MB by default: the writer's CPU per row is the same
        // as with 64 MB in `cargo bench --bench store`; see MIN_MEMORY_MB
        // for the least); a query that needs more spills to
        // `<store>.tmp` (an in-memory main database has no spill directory of
        // its own, so without this such a query failed out of memory).
        let spill_dir = format!("{}.tmp", sql_text(path));
        // The store file and its WAL stay reachable (only to ATTACH, which
        // operators' read-only queries cannot run): the writer attaches the
        // file afresh now and then to let go of its metadata (see
        // `Catalog::reattach`).
        let file = sql_text(path);
        store
            .conn
            .execute_batch(&format!(
                "SET threads = 1; SET memory_limit = '{memory_mb}MB'; SET temp_directory = '{spill_dir}'; SET allowed_paths = ['{file}', '{file}.wal']; SET enable_external_access = false; SET lock_configuration = true;",
            ))
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
        self.start_reattaching(
            writer::REATTACH_ROWS,
            flush_interval,
            queue_capacity,
            metrics,
        )
    }

    fn start_reattaching(
        self,
        reattach_rows: u64,
        flush_interval: Duration,
        queue_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Recorder, WriterHandle, StoreReader), StoreError> {
        let writer_conn = connect(&self.conn).map_err(|e| StoreError::Writer(e.to_string()))?;
        let catalog = Arc::new(Catalog {
            base: Mutex::new(self.conn),
            readers: AtomicUsize::new(0),
            attach: attach_sql(&self.path),
            reattach_rows,
            reattached: AtomicUsize::new(0),
        });
        let (recorder, handle) = writer::start(
            writer_conn,
            catalog.clone(),
            flush_interval,
            queue_capacity,
            metrics,
        )
        .map_err(|e| StoreError::Writer(e.to_string()))?;
        Ok((recorder, handle, StoreReader { catalog }))
    }
}

/// The attached store file, shared by the readers and the writer, which
/// attaches it afresh now and then: DuckDB keeps every row group's metadata
/// (about 40 KB a group of 4,096 rows, ~10 bytes a call) in memory for as
/// long as the file stays attached, and loads it lazily when attached again,
/// so without this a busy Warden's memory grew by ~10 MB a million calls.
pub(crate) struct Catalog {
    /// The connection readers clone theirs from; locked while the file is
    /// attached again, so that no reader starts in between.
    base: Mutex<Connection>,
    /// Readers with a connection in use: the file is not detached under them.
    readers: AtomicUsize,
    attach: String,
    /// Call rows committed between two attachments.
    pub(crate) reattach_rows: u64,
    /// How often the file was attached afresh.
    reattached: AtomicUsize,
}

impl Catalog {
    /// Detaches the store file and attaches it again on the writer's
    /// connection, unless a reader is busy (false: try again later). An
    /// error after the detach leaves the writer without a store until a
    /// later attempt succeeds, so it is retried at once and then reported.
    pub(crate) fn reattach(&self, writer: &Connection) -> Result<bool, duckdb::Error> {
        let _no_new_readers = self.base.lock().unwrap_or_else(|p| p.into_inner());
        if self.readers.load(Ordering::Acquire) > 0 {
            return Ok(false);
        }
        // IF EXISTS: after a failed attempt the file may be detached already.
        writer.execute_batch(&format!(
            "CHECKPOINT; USE memory; DETACH DATABASE IF EXISTS {CATALOG};"
        ))?;
        if let Err(first) = writer.execute_batch(&self.attach) {
            tracing::warn!(error = %first, "attaching the store again failed; retrying");
            writer.execute_batch(&self.attach)?;
        }
        writer.flush_prepared_statement_cache();
        self.reattached.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

/// Read access for operators while the writer runs.
#[derive(Clone)]
pub struct StoreReader {
    catalog: Arc<Catalog>,
}

/// A reader's connection, counted while in use (see `Catalog::readers`).
pub struct ReaderConnection {
    conn: Connection,
    catalog: Arc<Catalog>,
}

impl std::ops::Deref for ReaderConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for ReaderConnection {
    fn drop(&mut self) {
        self.catalog.readers.fetch_sub(1, Ordering::Release);
    }
}

impl StoreReader {
    /// A connection of its own for one query, so queries run side by side.
    fn connection(&self) -> Result<ReaderConnection, StoreError> {
        let base = self
            .catalog
            .base
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = connect(&base).map_err(|e| StoreError::Sql(e.to_string()))?;
        self.catalog.readers.fetch_add(1, Ordering::AcqRel);
        Ok(ReaderConnection {
            conn,
            catalog: self.catalog.clone(),
        })
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
        export::export_audit(&*self.connection()?, format, since, until)
    }

    pub fn verify_audit(&self) -> Result<audit::Verification, StoreError> {
        audit::verify(&*self.connection()?).map_err(|e| StoreError::Sql(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Usage;

    fn record(n: usize) -> CallRecord {
        CallRecord {
            call_id: format!("call-{n:08}"),
            ts_start_us: 1_764_600_000_000_000 + n as i64,
            ts_end_us: 1_764_600_000_001_000 + n as i64,
            agent: Some("alpha".into()),
            upstream: Some("openai".into()),
            provider: Some("openai"),
            model: Some("gpt-4o-mini".into()),
            endpoint: "/v1/chat/completions".into(),
            stream: false,
            status_code: 200,
            outcome: Outcome::Ok,
            usage: Usage {
                input_tokens: 10,
                output_tokens: 5,
                ..Usage::default()
            },
            usage_source: UsageSource::Provider,
            cost: None,
            latency_ms: 1.0,
            ttft_ms: None,
            run_id: None,
            step_id: None,
            error: None,
            pending_estimate: None,
        }
    }

    /// Writes `rows` call records through the writer and stops it.
    fn write_calls(path: &Path, from: usize, rows: usize) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Store::open(path).unwrap();
        let (recorder, writer, _reader) = store
            .start(Duration::from_millis(200), 65_536, Arc::default())
            .unwrap();
        runtime.block_on(async {
            for n in from..from + rows {
                recorder.record(record(n));
            }
            recorder.shutdown().await;
        });
        drop(recorder);
        writer.join();
    }

    #[test]
    fn the_writer_attaches_the_file_afresh_between_batches_but_never_under_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("reattach.duckdb")).unwrap();
        let (recorder, writer, reader) = store
            .start_reattaching(100, Duration::from_millis(20), 65_536, Arc::default())
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let count = |reader: &StoreReader| -> i64 {
            reader
                .with_connection(|conn| {
                    conn.query_row("SELECT count(*) FROM calls", [], |row| row.get(0))
                        .map_err(|e| StoreError::Sql(e.to_string()))
                })
                .unwrap()
        };
        let reattached = || reader.catalog.reattached.load(Ordering::Relaxed);
        runtime.block_on(async {
            for batch in 0..5 {
                for n in batch * 150..(batch + 1) * 150 {
                    recorder.record(record(n));
                }
                recorder.flush().await;
                assert_eq!(count(&reader), (batch as i64 + 1) * 150);
            }
            assert!(reattached() >= 4, "attached afresh {} times", reattached());

            // A reader holding its connection keeps the file attached.
            let held = reader.connection().unwrap();
            let before = reattached();
            for n in 750..1_000 {
                recorder.record(record(n));
            }
            // The writer attaches afresh after acknowledging a flush; the
            // second flush is taken only once that attempt is over.
            recorder.flush().await;
            recorder.flush().await;
            assert_eq!(reattached(), before, "detached under a reader");
            let seen: i64 = held
                .query_row("SELECT count(*) FROM calls", [], |row| row.get(0))
                .unwrap();
            assert_eq!(seen, 1_000);
            drop(held);
            // The attach put off while the reader was busy happens at the
            // next commit (a timed one may come first): once, since fewer
            // rows than the threshold follow.
            for n in 1_000..1_050 {
                recorder.record(record(n));
            }
            recorder.flush().await;
            recorder.flush().await;
            assert_eq!(reattached(), before + 1);
            recorder.shutdown().await;
        });
        drop(recorder);
        writer.join();
        assert_eq!(count(&reader), 1_050);
    }

    #[test]
    fn busy_commits_write_small_row_groups_that_any_duckdb_reads_with_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.duckdb");
        write_calls(&path, 0, 10_000);
        let plain = || duckdb::Connection::open(&path).unwrap();
        let count = |conn: &duckdb::Connection, sql: &str| -> i64 {
            conn.query_row(sql, [], |row| row.get(0)).unwrap()
        };
        {
            // Another DuckDB, with its default row groups, adds rows of its own.
            let conn = plain();
            let groups = "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('calls')";
            assert!(
                count(&conn, groups) >= 3,
                "10,000 rows in groups of {ROW_GROUP_ROWS}"
            );
            conn.execute_batch(
                "INSERT INTO calls SELECT * REPLACE ('old-' || call_id AS call_id) FROM calls LIMIT 5000",
            )
            .unwrap();
        }
        write_calls(&path, 10_000, 10_000);
        let conn = plain();
        assert_eq!(count(&conn, "SELECT count(*) FROM calls"), 25_000);
        assert_eq!(
            count(&conn, "SELECT count(DISTINCT call_id) FROM calls"),
            25_000
        );
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM calls WHERE call_id = 'call-00019999'"
            ),
            1
        );
    }

    #[test]
    fn part_filled_batches_are_committed_within_the_flush_interval_unasked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("trickle.duckdb")).unwrap();
        let (recorder, writer, reader) = store
            .start(Duration::from_millis(50), 65_536, Arc::default())
            .unwrap();
        let committed = || -> i64 {
            reader
                .with_connection(|conn| {
                    conn.query_row("SELECT count(*) FROM calls", [], |row| row.get(0))
                        .map_err(|e| StoreError::Sql(e.to_string()))
                })
                .unwrap()
        };
        let wait_for = |rows: i64| {
            // No flush is asked for: the writer must commit a batch short of
            // a row group on its own once the interval has passed.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while committed() < rows && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(committed(), rows);
        };
        for n in 0..10 {
            recorder.record(record(n));
        }
        wait_for(10);
        // A whole row group and a few more: the rest must not wait for a
        // second group that never comes.
        for n in 10..10 + ROW_GROUP_ROWS + 7 {
            recorder.record(record(n));
        }
        wait_for(10 + ROW_GROUP_ROWS as i64 + 7);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(recorder.shutdown());
        drop(recorder);
        writer.join();
    }
}
