//! Workflow definitions served from `[workflows] dir`: loaded at start,
//! versioned in the store, reloaded on edit, refused (and audited) when
//! invalid while the previous version keeps serving.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;

use crate::common::*;

const PAIR: &str = r#"
name = "pair"
description = "Alpha researches, beta writes."

[inputs]
topic = { type = "string", required = true }

[[steps]]
id = "research"
agent = "alpha"
instructions = "Research {{ inputs.topic }}."

[[steps]]
id = "write"
agent = "beta"
needs = ["research"]
instructions = "Write from {{ steps.research.output }}."
"#;

async fn listing(tw: &TestWarden) -> Vec<Value> {
    let answer = tw
        .admin_request(
            Method::GET,
            "/admin/v1/workflows",
            Some(OPERATOR_TOKEN),
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["workflows"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_load_version_reload_and_refuse_bad_edits() {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("pair.toml"), PAIR).unwrap();
    std::fs::write(
        flows.join("loop.toml"),
        PAIR.replace("name = \"pair\"", "name = \"loop\"").replace(
            "agent = \"alpha\"",
            "agent = \"alpha\"\nneeds = [\"write\"]",
        ),
    )
    .unwrap();
    let mut tw = TestWarden::start_with(
        Options {
            extra: format!("[workflows]\ndir = \"{}\"\n", flows.display()),
            ..Options::default()
        },
        |_| Reply::json(fixture("openai/chat_completion.json")),
    )
    .await;
    let served = listing(&tw).await;
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0]["name"], "pair");
    assert_eq!(served[0]["steps"], 2);
    let first = served[0]["version_hash"].as_str().unwrap().to_owned();
    let refused = tw
        .scalar("SELECT payload->>'error' FROM audit_log WHERE kind = 'workflow_refused'")
        .await
        .unwrap();
    assert!(
        refused.contains("loop.toml:") && refused.contains("cycle"),
        "{refused}"
    );

    // An edit is a new version; the old one stays in the store.
    let (_, second) = tw
        .edit_workflow(
            &flows,
            "pair",
            &PAIR.replace("Alpha researches", "Alpha digs"),
        )
        .await;
    assert_eq!(
        tw.scalar("SELECT count(*) FROM workflow_versions WHERE workflow = 'pair'")
            .await
            .as_deref(),
        Some("2")
    );
    assert!(
        tw.scalar(&format!(
            "SELECT definition FROM workflow_versions WHERE version_hash = '{second}'"
        ))
        .await
        .unwrap()
        .contains("Alpha digs")
    );

    // A bad edit is refused and the last good version keeps serving.
    std::fs::write(
        flows.join("pair.toml"),
        PAIR.replace("agent = \"beta\"", "agent = \"gamma\""),
    )
    .unwrap();
    for _ in 0..200 {
        let refusals: u32 = tw
            .scalar("SELECT count(*) FROM audit_log WHERE kind = 'workflow_refused'")
            .await
            .unwrap()
            .parse()
            .unwrap();
        if refusals == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = tw
        .scalar("SELECT payload->>'error' FROM audit_log WHERE kind = 'workflow_refused' ORDER BY seq DESC LIMIT 1")
        .await
        .unwrap();
    assert!(
        refused.contains("pair.toml:") && refused.contains("`gamma`"),
        "{refused}"
    );
    assert_eq!(listing(&tw).await[0]["version_hash"], second.as_str());

    // A restart does not store known versions again.
    std::fs::write(flows.join("pair.toml"), PAIR).unwrap();
    tw.restart().await;
    assert_eq!(listing(&tw).await[0]["version_hash"], first.as_str());
    assert_eq!(
        tw.scalar("SELECT count(*) FROM workflow_versions")
            .await
            .as_deref(),
        Some("2")
    );
}
