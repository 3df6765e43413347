//! Read-only SQL for operators (`warden query`).
//!
//! Three fences, so that a mistake in one does not open the store:
//! the statement must start like a read and name no file reader; it runs
//! wrapped as a subquery (`SELECT … FROM (<sql>)`), which DuckDB only accepts
//! for a single query; and it runs inside a transaction that is always rolled
//! back. The database itself has external access (files, ATTACH, COPY,
//! extensions) disabled at open.

use duckdb::Connection;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("warden query is read-only: {0}")]
    NotARead(String),
    #[error("{0}")]
    Sql(String),
    /// DuckDB's own advice (`SET memory_limit`, `SET threads`) does not apply:
    /// the configuration is locked, and the limit is Warden's setting.
    #[error(
        "the query needs more memory than the store's buffer pool allows ({0}); raise `store_memory_mb` under [server] in warden.toml and restart Warden, or narrow the query (a time range, approx_quantile instead of quantile_cont, fewer DISTINCT columns)"
    )]
    OutOfMemory(String),
}

impl QueryError {
    /// Told apart by DuckDB's message: the C API gives a failed statement no
    /// error type, only the text, which starts with the exception's type.
    fn from_duckdb(error: duckdb::Error) -> QueryError {
        let message = error.to_string();
        match message.strip_prefix("Out of Memory Error: ") {
            Some(rest) => QueryError::OutOfMemory(rest.lines().next().unwrap_or(rest).to_owned()),
            None => QueryError::Sql(message),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Column {
    pub name: String,
    /// `number`, `boolean` or `text`: how JSON output should show values.
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<Column>,
    /// Every value as DuckDB prints it, so decimals stay exact.
    pub rows: Vec<Vec<Option<String>>>,
    pub truncated: bool,
}

const READ_STARTS: &[&str] = &[
    "select",
    "with",
    "from",
    "values",
    "table",
    "show",
    "describe",
    "summarize",
    "pivot",
    "unpivot",
    "(",
];

const FILE_READERS: &[&str] = &[
    "read_csv",
    "read_csv_auto",
    "read_json",
    "read_json_auto",
    "read_json_objects",
    "read_ndjson",
    "read_ndjson_auto",
    "read_ndjson_objects",
    "read_parquet",
    "parquet_scan",
    "parquet_metadata",
    "parquet_schema",
    "read_text",
    "read_blob",
    "glob",
    "sniff_csv",
    "csv_scan",
    "query_table",
    "getenv",
];

/// Strips comments and trailing semicolons, and refuses what cannot be a read.
pub fn check_read_only(sql: &str) -> Result<String, QueryError> {
    let cleaned = strip_comments(sql);
    let trimmed = cleaned.trim().trim_end_matches(';').trim();
    if trimmed.is_empty() {
        return Err(QueryError::NotARead("the query is empty".into()));
    }
    let lower = trimmed.to_ascii_lowercase();
    let first: String = lower
        .chars()
        .take_while(|c| c.is_ascii_alphabetic() || *c == '(')
        .collect();
    let first = if first.starts_with('(') {
        "("
    } else {
        first.as_str()
    };
    if !READ_STARTS.contains(&first) {
        let word = first.to_ascii_uppercase();
        return Err(QueryError::NotARead(format!(
            "`{word}` statements are refused; write a SELECT (or SHOW, DESCRIBE, SUMMARIZE)"
        )));
    }
    for word in lower.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if FILE_READERS.contains(&word) {
            return Err(QueryError::NotARead(format!(
                "`{word}` reads outside the store and is refused"
            )));
        }
    }
    Ok(trimmed.to_owned())
}

/// Removes `--` and `/* */` comments outside string literals, so a comment
/// cannot swallow the closing parenthesis of the wrapper.
fn strip_comments(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

fn kind_of(data_type: &duckdb::arrow::datatypes::DataType) -> &'static str {
    use duckdb::arrow::datatypes::DataType::*;
    match data_type {
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float16 | Float32
        | Float64 | Decimal128(..) | Decimal256(..) => "number",
        Boolean => "boolean",
        _ => "text",
    }
}

/// Runs `sql` read-only, returning at most `max_rows` rows.
pub fn run(conn: &Connection, sql: &str, max_rows: usize) -> Result<QueryResult, QueryError> {
    let sql = check_read_only(sql)?;
    let err = QueryError::from_duckdb;
    conn.execute_batch("BEGIN TRANSACTION").map_err(err)?;
    let result = run_in_transaction(conn, &sql, max_rows);
    let _ = conn.execute_batch("ROLLBACK");
    result
}

fn run_in_transaction(
    conn: &Connection,
    sql: &str,
    max_rows: usize,
) -> Result<QueryResult, QueryError> {
    let err = QueryError::from_duckdb;
    let columns = {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT * FROM (\n{sql}\n) AS warden_query LIMIT 0"
            ))
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while rows.next().map_err(err)?.is_some() {}
        drop(rows);
        let names = stmt.column_names();
        (0..names.len())
            .map(|i| Column {
                name: names[i].clone(),
                kind: kind_of(&stmt.column_type(i)).to_owned(),
            })
            .collect::<Vec<_>>()
    };
    let mut stmt = conn
        .prepare(&format!(
            "SELECT COLUMNS(*)::VARCHAR FROM (\n{sql}\n) AS warden_query LIMIT {}",
            max_rows + 1
        ))
        .map_err(err)?;
    let mut rows = stmt.query([]).map_err(err)?;
    let mut out = Vec::new();
    let mut truncated = false;
    while let Some(row) = rows.next().map_err(err)? {
        if out.len() == max_rows {
            truncated = true;
            break;
        }
        let values = (0..columns.len())
            .map(|i| row.get::<_, Option<String>>(i))
            .collect::<Result<Vec<_>, _>>();
        out.push(values.map_err(err)?);
    }
    Ok(QueryResult {
        columns,
        rows: out,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pass_and_writes_are_refused() {
        assert!(check_read_only("SELECT 1;").is_ok());
        assert!(check_read_only("  -- cost\nwith x as (select 1) select * from x").is_ok());
        assert!(check_read_only("FROM calls").is_ok());
        assert!(check_read_only("describe calls").is_ok());
        for bad in [
            "DELETE FROM calls",
            "drop table calls",
            "INSERT INTO calls VALUES (1)",
            "ATTACH 'x.db'",
            "COPY calls TO 'x.csv'",
            "INSTALL httpfs",
            "LOAD httpfs",
            "SET enable_external_access = true",
            "PRAGMA version",
            "CALL checkpoint()",
            "/* */ UPDATE calls SET cost_usd = 0",
            "",
            "  ;  ",
        ] {
            assert!(
                matches!(check_read_only(bad), Err(QueryError::NotARead(_))),
                "{bad:?} passed"
            );
        }
    }

    #[test]
    fn file_readers_are_refused() {
        for bad in [
            "SELECT * FROM read_csv('/etc/passwd')",
            "select * from READ_PARQUET('x')",
            "select * from glob('*')",
            "select getenv('OPENAI_API_KEY')",
        ] {
            assert!(
                matches!(check_read_only(bad), Err(QueryError::NotARead(_))),
                "{bad:?} passed"
            );
        }
    }

    #[test]
    fn comments_cannot_hide_the_wrapper() {
        assert_eq!(check_read_only("select 1 -- trailing").unwrap(), "select 1");
        assert_eq!(
            strip_comments("select '--not a comment'"),
            "select '--not a comment'"
        );
    }

    #[test]
    fn runs_on_a_real_database_and_rolls_back() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER, b VARCHAR, c DECIMAL(38,18)); INSERT INTO t VALUES (1, 'x', 0.000001), (2, NULL, 3)").unwrap();
        let result = run(&conn, "select * from t order by a;", 10).unwrap();
        assert_eq!(
            result
                .columns
                .iter()
                .map(|c| c.kind.as_str())
                .collect::<Vec<_>>(),
            ["number", "text", "number"]
        );
        assert_eq!(
            result.rows[0],
            vec![
                Some("1".into()),
                Some("x".into()),
                Some("0.000001000000000000".into())
            ]
        );
        assert_eq!(result.rows[1][1], None);
        let result = run(&conn, "select * from t", 1).unwrap();
        assert!(result.truncated && result.rows.len() == 1);
        // A second statement cannot ride along inside the wrapper.
        assert!(run(&conn, "select 1); drop table t; select (1", 10).is_err());
        assert_eq!(
            run(&conn, "select count(*) from t", 10).unwrap().rows[0][0].as_deref(),
            Some("2")
        );
    }

    #[test]
    fn a_query_over_the_buffer_pool_names_warden_s_setting_not_duckdb_s() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::Store::open_with_memory(&dir.path().join("w.duckdb"), 16).unwrap();
        // An exact quantile holds every value and cannot spill: 4 M doubles
        // are 32 MB, twice the pool.
        let error = store
            .query(
                "SELECT quantile_cont(x::DOUBLE, 0.99) FROM range(4000000) t(x)",
                10,
            )
            .unwrap_err();
        let QueryError::OutOfMemory(_) = &error else {
            panic!("not an out-of-memory error: {error}");
        };
        let message = error.to_string();
        assert!(message.contains("store_memory_mb"), "{message}");
        assert!(!message.contains("SET memory_limit"), "{message}");
        // The approximate quantile fits, as the message suggests.
        let fine = store
            .query(
                "SELECT approx_quantile(x::DOUBLE, 0.99) FROM range(4000000) t(x)",
                10,
            )
            .unwrap();
        assert_eq!(fine.rows.len(), 1);
    }
}
