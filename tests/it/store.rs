//! The store: migrations, the audit chain, shutdown flushing, and secrets
//! that never land in it.

use serde_json::json;
use warden::store::audit::Verification;
use warden::store::{Store, schema};

use crate::common::*;

#[test]
fn an_older_store_file_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.duckdb");
    {
        let conn = duckdb::Connection::open(&path).unwrap();
        assert_eq!(schema::migrate_to(&conn, 1).unwrap(), vec![1]);
        conn.execute_batch(
            "INSERT INTO calls VALUES ('old-call', now()::TIMESTAMP, now()::TIMESTAMP, 'alpha', 'u', 'openai', 'gpt-4o', '/v1/chat/completions', false, 200, 'ok', 10, 5, 0, 0, 0, 'provider', 0.001, 12.5, 3.0, NULL, NULL, NULL)",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), schema::latest_version());
    let rows = store
        .query("SELECT call_id, cost_usd FROM calls", 10)
        .unwrap();
    assert_eq!(
        rows.rows[0][0].as_deref(),
        Some("old-call"),
        "the old rows survive the upgrade"
    );
    let views = store
        .query("SELECT agent, calls FROM cost_by_agent", 10)
        .unwrap();
    assert_eq!(
        views.rows[0],
        [Some("alpha".to_owned()), Some("1".to_owned())]
    );
    drop(store);
    // Opening again applies nothing and changes nothing.
    let store = Store::open(&path).unwrap();
    let versions = store
        .query("SELECT count(*) FROM schema_version", 10)
        .unwrap();
    assert_eq!(
        versions.rows[0][0].as_deref(),
        Some(schema::latest_version().to_string().as_str())
    );
}

#[test]
fn a_store_from_a_newer_warden_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.duckdb");
    drop(Store::open(&path).unwrap());
    {
        let conn = duckdb::Connection::open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO schema_version (version, description) VALUES (999, 'future')",
        )
        .unwrap();
    }
    let err = Store::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains("999") && err.contains("upgrade Warden"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_commits_every_call_and_the_audit_chain_verifies_then_detects_tampering() {
    let mut warden =
        TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    for _ in 0..25 {
        let answer = warden
            .post(
                "/v1/chat/completions",
                AGENT_KEY,
                json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    // No flush: shutdown alone must commit what the writer holds.
    warden.stop().await;
    let path = warden.store_path();
    let conn = duckdb::Connection::open(&path).unwrap();
    let count: i64 = conn
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 25);
    let kinds: Vec<String> = conn
        .prepare("SELECT kind FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(kinds, ["warden_started", "warden_stopped"]);
    match warden::store::audit::verify(&conn).unwrap() {
        Verification::Intact { rows, .. } => assert_eq!(rows, 2),
        broken => panic!("{broken:?}"),
    }
    conn.execute_batch("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        .unwrap();
    assert!(matches!(
        warden::store::audit::verify(&conn).unwrap(),
        Verification::Broken { seq: 1, .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_store() {
    let mut warden = TestWarden::start(|seen| {
        if seen.path == "/v1/responses" {
            Reply::status(401, fixture("openai/error_invalid_key.json"))
        } else {
            Reply::json(fixture("openai/chat_completion.json"))
        }
    })
    .await;
    warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o", "messages": []}).to_string(),
        )
        .await;
    warden
        .post(
            "/v1/responses",
            AGENT_KEY,
            json!({"model": "gpt-4o", "input": "x"}).to_string(),
        )
        .await;
    warden
        .post(
            "/v1/chat/completions",
            "wk_guessed_key",
            json!({"model": "gpt-4o"}).to_string(),
        )
        .await;
    warden
        .admin_request(
            http::Method::POST,
            "/admin/v1/query",
            Some(OPERATOR_TOKEN),
            Some(json!({"sql": "SELECT 1"})),
        )
        .await;
    warden.stop().await;
    let conn = duckdb::Connection::open(warden.store_path()).unwrap();
    let dump: String = conn
        .query_row(
            "SELECT string_agg(x, ' ') FROM (SELECT CAST(c AS VARCHAR) AS x FROM calls c UNION ALL SELECT CAST(a AS VARCHAR) FROM audit_log a)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(dump.contains("alpha"), "the dump is the real store content");
    for secret in [
        AGENT_KEY,
        "wk_guessed_key",
        PROVIDER_KEY,
        OPERATOR_TOKEN,
        "sk-abc",
    ] {
        assert!(!dump.contains(secret), "{secret} is in the store");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_writer_checkpoints_its_rows_into_the_file() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use warden::store::record::AlertRow;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quiet.duckdb");
    let wal = dir.path().join("quiet.duckdb.wal");
    let store = Store::open(&path).unwrap();
    let (recorder, writer, reader) = store
        .start(
            Duration::from_millis(50),
            4096,
            Arc::new(warden::metrics::Metrics::default()),
        )
        .unwrap();
    // Row statements (alerts, approvals) in a burst, as held calls make them.
    for n in 0..2_000 {
        recorder.alert(AlertRow {
            alert_id: format!("alert-{n}"),
            ts_us: warden::store::record::now_micros(),
            rule: "approval_requested".to_owned(),
            severity: "warning",
            subject: format!("approval-{n}"),
            message: "a call waits for an operator's approval".to_owned(),
        });
    }
    recorder.flush().await;
    let committed = reader.query("SELECT count(*) FROM alerts", 10).unwrap();
    assert_eq!(committed.rows[0][0].as_deref(), Some("2000"));
    assert!(
        std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0),
        "committed rows are in the WAL until a checkpoint"
    );
    // Nothing more arrives: within a few quiet seconds the rows move into
    // the file and the WAL is emptied.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        assert!(
            Instant::now() < deadline,
            "the WAL was never checkpointed while the writer was idle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = reader.query("SELECT count(*) FROM alerts", 10).unwrap();
    assert_eq!(kept.rows[0][0].as_deref(), Some("2000"));
    drop(recorder);
    writer.join();
}
