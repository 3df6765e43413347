//! `warden audit export`: the audit log, or a time slice of it, as JSON
//! lines, CSV or Parquet for compliance tools.
//!
//! The live store's connections may not touch files, so the rows are copied
//! into a private in-memory database, which writes the file with DuckDB's
//! own CSV, JSON and Parquet writers.

use duckdb::Connection;
use duckdb::types::{TimeUnit, Value};

use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Jsonl,
    Csv,
    Parquet,
}

impl ExportFormat {
    pub fn parse(text: &str) -> Option<ExportFormat> {
        match text {
            "jsonl" | "json" => Some(ExportFormat::Jsonl),
            "csv" => Some(ExportFormat::Csv),
            "parquet" => Some(ExportFormat::Parquet),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Jsonl => "application/x-ndjson",
            ExportFormat::Csv => "text/csv",
            ExportFormat::Parquet => "application/vnd.apache.parquet",
        }
    }

    fn copy_options(self) -> &'static str {
        match self {
            ExportFormat::Jsonl => "FORMAT json",
            ExportFormat::Csv => "FORMAT csv, HEADER true",
            ExportFormat::Parquet => "FORMAT parquet",
        }
    }
}

/// The audit rows with `since <= ts < until` (either bound optional; any
/// timestamp text DuckDB reads, like `2026-11-24` or `2026-11-24 13:00`).
pub fn export_audit(
    source: &Connection,
    format: ExportFormat,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<Vec<u8>, StoreError> {
    let sql_error = |e: duckdb::Error| StoreError::Sql(e.to_string());
    let mut stmt = source
        .prepare(
            "SELECT seq, epoch_us(ts), actor, kind, subject, CAST(payload AS VARCHAR), prev_hash, hash FROM audit_log \
             WHERE (?::VARCHAR IS NULL OR ts >= CAST(?::VARCHAR AS TIMESTAMP)) AND (?::VARCHAR IS NULL OR ts < CAST(?::VARCHAR AS TIMESTAMP)) \
             ORDER BY seq",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(duckdb::params![since, since, until, until], |row| {
            Ok([
                Value::BigInt(row.get(0)?),
                Value::Timestamp(TimeUnit::Microsecond, row.get(1)?),
                Value::Text(row.get(2)?),
                Value::Text(row.get(3)?),
                row.get::<_, Option<String>>(4)?
                    .map_or(Value::Null, Value::Text),
                Value::Text(row.get(5)?),
                Value::Text(row.get(6)?),
                Value::Text(row.get(7)?),
            ])
        })
        .map_err(sql_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Sql(format!("cannot read the audit log: {e}")))?;

    let scratch = Connection::open_in_memory().map_err(sql_error)?;
    scratch
        .execute_batch(
            "CREATE TABLE audit_log (seq BIGINT, ts TIMESTAMP, actor VARCHAR, kind VARCHAR, subject VARCHAR, payload JSON, prev_hash VARCHAR, hash VARCHAR)",
        )
        .map_err(sql_error)?;
    {
        let mut appender = scratch.appender("audit_log").map_err(sql_error)?;
        for row in rows {
            appender.append_row(row).map_err(sql_error)?;
        }
        appender.flush().map_err(sql_error)?;
    }
    let path = std::env::temp_dir().join(format!(
        "warden-audit-{}.{}",
        uuid::Uuid::now_v7(),
        match format {
            ExportFormat::Jsonl => "jsonl",
            ExportFormat::Csv => "csv",
            ExportFormat::Parquet => "parquet",
        }
    ));
    let quoted = path.display().to_string().replace('\'', "''");
    let written = scratch.execute_batch(&format!(
        "COPY (SELECT * FROM audit_log ORDER BY seq) TO '{quoted}' ({})",
        format.copy_options()
    ));
    let bytes = written
        .map_err(sql_error)
        .and_then(|()| std::fs::read(&path).map_err(|e| StoreError::Sql(e.to_string())));
    let _ = std::fs::remove_file(&path);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_a_time_slice_in_every_format() {
        let conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate_to(&conn, crate::store::schema::latest_version()).unwrap();
        conn.execute_batch(
            "INSERT INTO audit_log VALUES \
             (1, '2026-01-01 10:00:00', 'warden', 'warden_started', NULL, '{}', 'x', 'h1'), \
             (2, '2026-01-02 10:00:00', 'alice', 'halt', 'agent:a', '{\"reason\":\"r\"}', 'h1', 'h2')",
        )
        .unwrap();
        let jsonl = export_audit(&conn, ExportFormat::Jsonl, Some("2026-01-02"), None).unwrap();
        let text = String::from_utf8(jsonl).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("\"actor\":\"alice\"") && text.contains("\"reason\":\"r\""),
            "{text}"
        );
        let csv = export_audit(&conn, ExportFormat::Csv, None, Some("2026-01-02")).unwrap();
        let text = String::from_utf8(csv).unwrap();
        assert!(
            text.starts_with("seq,ts,actor") && text.contains("warden_started"),
            "{text}"
        );
        assert!(!text.contains("alice"));
        let parquet = export_audit(&conn, ExportFormat::Parquet, None, None).unwrap();
        assert_eq!(&parquet[..4], b"PAR1");
    }
}
