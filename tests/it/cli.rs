//! The `warden` binary as an operator runs it.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::common::*;

fn warden() -> Command {
    Command::new(env!("CARGO_BIN_EXE_warden"))
}

#[test]
fn init_writes_a_config_that_serve_accepts_and_prints_credentials_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warden.toml");
    let out = warden()
        .args(["init", "--path"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout
        .split_whitespace()
        .find(|w| w.starts_with("wk_"))
        .expect("an agent key is printed");
    let token = stdout
        .split_whitespace()
        .find(|w| w.starts_with("wt_"))
        .expect("an operator token is printed");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains(key) && !text.contains(token),
        "secrets are not in the file"
    );
    assert!(text.contains(&warden::config::sha256_hex(key)));
    assert!(text.contains(&warden::config::sha256_hex(token)));
    warden::config::Config::load(&path).unwrap();
    // A second init does not overwrite.
    let again = warden()
        .args(["init", "--path"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn serve_refuses_a_bad_config_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"x\"\nkind = \"gemini\"\n",
    )
    .unwrap();
    let out = warden()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:6:", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("gemini"), "{stderr}");
}

#[test]
fn serve_names_a_missing_provider_key_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warden.toml");
    let text = config_text(
        "http://127.0.0.1:9/v1",
        "http://127.0.0.1:9",
        &dir.path().join("w.duckdb"),
        &Options::default(),
    )
    .replace(PROVIDER_KEY_ENV, "WARDEN_TEST_KEY_THAT_IS_NOT_SET");
    std::fs::write(&path, text).unwrap();
    let out = warden()
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("WARDEN_TEST_KEY_THAT_IS_NOT_SET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARDEN_TEST_KEY_THAT_IS_NOT_SET") && stderr.contains("not set"),
        "{stderr}"
    );
}

fn chat_request(port: u16) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("authorization", format!("Bearer {AGENT_KEY}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
        )))
        .unwrap()
}

/// Picks a free port for a child process to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_records_calls_answers_query_and_flushes_on_sigterm() {
    let upstream =
        FakeUpstream::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let store = dir.path().join("warden.duckdb");
    let text = config_text(
        &format!("{}/v1", upstream.url()),
        &upstream.url(),
        &store,
        &Options::default(),
    )
    .replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
    )
    .replace(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"127.0.0.1:{port}\""),
    );
    let config = dir.path().join("warden.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = warden()
        .args(["serve", "--config"])
        .arg(&config)
        .env(PROVIDER_KEY_ENV, PROVIDER_KEY)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut served = false;
    for _ in 0..300 {
        let request = http::Request::get(format!("http://127.0.0.1:{admin_port}/healthz"))
            .body(Default::default())
            .unwrap();
        if client
            .request(request)
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !served {
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        panic!(
            "warden serve did not come up:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for _ in 0..3 {
        assert_eq!(
            client.request(chat_request(port)).await.unwrap().status(),
            200
        );
    }

    let admin_url = format!("http://127.0.0.1:{admin_port}");
    tokio::time::sleep(Duration::from_millis(300)).await; // one flush interval and more
    let out = warden()
        .args([
            "query",
            "SELECT agent, calls FROM cost_by_agent",
            "--format",
            "csv",
            "--admin-url",
            &admin_url,
        ])
        .env("WARDEN_TOKEN", OPERATOR_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "agent,calls\nalpha,3\n"
    );

    let refused = warden()
        .args([
            "query",
            "DELETE FROM calls",
            "--admin-url",
            &admin_url,
            "--token",
            OPERATOR_TOKEN,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("read-only"));
    let no_token = warden()
        .args(["query", "SELECT 1", "--admin-url", &admin_url])
        .env_remove("WARDEN_TOKEN")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("WARDEN_TOKEN"));

    // One more call right before SIGTERM: the drain and final flush keep it.
    assert_eq!(
        client.request(chat_request(port)).await.unwrap().status(),
        200
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let logs = String::from_utf8_lossy(&status.stderr);
    assert!(
        !logs.contains(PROVIDER_KEY) && !logs.contains(AGENT_KEY),
        "secrets in the logs"
    );

    let conn = duckdb::Connection::open(&store).unwrap();
    let count: i64 = conn
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 4);
}

#[test]
fn demo_runs_the_sample_workflow_offline_and_prints_its_dag_and_costs() {
    let out = warden().arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "of research_brief",
        "researcher takes `research`",
        "writer     takes `draft`",
        "(no headers: its only running step)",
        "demo-operator approves",
        "SUCCEEDED",
        "5/5 steps done",
        "Cost by agent",
        "Cost by model",
        "claude-sonnet-4-5",
        "gpt-4o-mini",
        "Audit chain: intact",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    let dag_line = |step: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!(" {step} ")) && l.contains("succeeded"))
            .unwrap_or_else(|| panic!("no DAG line for {step} in\n{stdout}"))
            .to_owned()
    };
    assert!(dag_line("research").contains("researcher"));
    assert!(dag_line("draft").contains("writer"));
    assert!(dag_line("approve").contains("demo-operator"));
    assert!(dag_line("publish").contains("warden"));
    assert!(
        stdout.contains("(3 rows)"),
        "two agents and Warden's own model step in the cost table:\n{stdout}"
    );
}

/// Runs the `warden` binary against a running Warden's admin API.
async fn cli(tw: &TestWarden, args: &[&str]) -> std::process::Output {
    let admin = tw.admin();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        warden()
            .args(&args)
            .args(["--admin-url", &admin])
            .env("WARDEN_TOKEN", OPERATOR_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_approve_halt_watch_and_check_the_audit_trail_from_the_cli() {
    let extra = format!(
        "[[policies]]\nname = \"cost_gate\"\nmodule = \"{}/policies/cost_gate.wasm\"\nconfig = {{ max_call_usd = 0.05, hard_max_usd = 5.0 }}\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut tw = TestWarden::start_with(
        Options {
            extra,
            ..Options::default()
        },
        |_| Reply::json(fixture("openai/chat_completion.json")),
    )
    .await;
    let mut watch = warden()
        .args([
            "watch",
            "--kind",
            "approval_requested,approval_decided,halt",
            "--admin-url",
            &tw.admin(),
        ])
        .env("WARDEN_TOKEN", OPERATOR_TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The watcher is subscribed once Warden counts it.
    let body = json!({"model": "gpt-4o", "max_tokens": 40000, "messages": [{"role": "user", "content": "big job"}]}).to_string();
    for _ in 0..400 {
        if tw.gateway().supervisor().events.is_watched() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        tw.gateway().supervisor().events.is_watched(),
        "warden watch never connected"
    );
    let held = tw.spawn_send(
        tw.request("/v1/chat/completions", Some(AGENT_KEY))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap(),
    );

    let mut listing = String::new();
    for _ in 0..200 {
        listing = stdout_of(&cli(&tw, &["approvals", "list"]).await);
        if listing.contains("alpha") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        listing.contains("cost_gate") && listing.contains("gpt-4o"),
        "{listing}"
    );
    let id = listing
        .lines()
        .nth(2)
        .and_then(|line| line.split_whitespace().next())
        .expect("a row")
        .to_owned();
    let approved = stdout_of(&cli(&tw, &["approvals", "approve", &id, "--reason", "fine"]).await);
    assert!(approved.contains("approved"), "{approved}");
    assert_eq!(held.await.unwrap().status, http::StatusCode::OK);
    let again = cli(&tw, &["approvals", "reject", &id, "--reason", "late"]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already approved by olga"));

    let halted = stdout_of(
        &cli(
            &tw,
            &["halt", "--agent", "beta", "--reason", "looping on search"],
        )
        .await,
    );
    assert!(halted.contains("agent:beta halted"), "{halted}");
    let halts = stdout_of(&cli(&tw, &["halts"]).await);
    assert!(
        halts.contains("agent:beta")
            && halts.contains("olga")
            && halts.contains("looping on search"),
        "{halts}"
    );
    let both = cli(&tw, &["halt", "--agent", "beta", "--all", "--reason", "x"]).await;
    assert!(!both.status.success());
    stdout_of(&cli(&tw, &["resume", "--agent", "beta"]).await);
    assert!(stdout_of(&cli(&tw, &["halts"]).await).contains("no active halts"));

    // The watcher printed each event as one line.
    let _ = watch.kill();
    let printed = tokio::task::spawn_blocking(move || watch.wait_with_output().unwrap())
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    let kinds: Vec<&str> = printed
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        kinds,
        ["approval_requested", "approval_decided", "halt"],
        "{printed}"
    );

    let verified = stdout_of(&cli(&tw, &["audit", "verify"]).await);
    assert!(verified.contains("audit chain intact"), "{verified}");
    let csv = stdout_of(&cli(&tw, &["audit", "export", "--format", "csv"]).await);
    assert!(csv.starts_with("seq,ts,actor,kind"), "{csv}");
    assert!(
        csv.contains("approval_decided") && csv.contains("resume"),
        "{csv}"
    );
    let parquet = tw.dir.path().join("audit.parquet");
    stdout_of(
        &cli(
            &tw,
            &[
                "audit",
                "export",
                "--format",
                "parquet",
                "--output",
                parquet.to_str().unwrap(),
            ],
        )
        .await,
    );
    assert_eq!(&std::fs::read(&parquet).unwrap()[..4], b"PAR1");
    let future = stdout_of(&cli(&tw, &["audit", "export", "--since", "2999-01-01"]).await);
    assert!(future.is_empty(), "{future}");

    // Tampering with the stopped store is found, naming the first bad entry.
    tw.stop().await;
    let store = tw.store_path();
    let offline = |store: &std::path::Path| {
        warden()
            .args(["audit", "verify", "--store"])
            .arg(store)
            .output()
            .unwrap()
    };
    assert!(stdout_of(&offline(&store)).contains("intact"));
    let tampered = [
        (
            "UPDATE audit_log SET actor = 'mallory' WHERE seq = 3",
            "seq 3",
        ),
        ("DELETE FROM audit_log WHERE seq = 4", "seq 5"),
        (
            "INSERT INTO audit_log SELECT 4, ts, actor, kind, subject, payload, prev_hash, hash FROM audit_log WHERE seq = 2",
            "seq 4",
        ),
        (
            "UPDATE audit_log SET seq = CASE seq WHEN 5 THEN 6 WHEN 6 THEN 5 ELSE seq END",
            "seq 5",
        ),
    ];
    for (edit, named) in tampered {
        let copy = tw.dir.path().join("tampered.duckdb");
        std::fs::copy(&store, &copy).unwrap();
        let _ = std::fs::remove_file(tw.dir.path().join("tampered.duckdb.wal"));
        duckdb::Connection::open(&copy)
            .unwrap()
            .execute_batch(edit)
            .unwrap();
        let out = offline(&copy);
        assert!(!out.status.success(), "{edit} went unnoticed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{edit}: {stderr}");
        std::fs::remove_file(&copy).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_start_show_watch_cancel_and_roll_back_runs_from_the_cli() {
    use crate::runs::{DIAMOND, poll, script, step_call, with_flows};
    let (mut tw, flows) = with_flows(&[("brief.toml", DIAMOND)], script).await;

    let started = stdout_of(
        &cli(
            &tw,
            &[
                "runs",
                "start",
                "brief",
                "--input",
                "topic=tides",
                "-i",
                "words=120",
            ],
        )
        .await,
    );
    assert!(
        started.contains("no completed runs of this version yet"),
        "{started}"
    );
    let run_id = started.lines().last().unwrap().trim().to_owned();
    assert!(
        run_id.starts_with("run-"),
        "the run id is the last line: {started}"
    );
    let refused = cli(&tw, &["runs", "start", "brief", "--input", "words=12"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("`topic` is required"));

    let work = poll(&tw, AGENT_KEY).await;
    step_call(&tw, AGENT_KEY, &work[0], "REPLY=sources").await;
    let shown = stdout_of(&cli(&tw, &["runs", "show", &run_id]).await);
    let line = |needle: &str| {
        shown
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{shown}"))
            .to_owned()
    };
    assert!(line("RUNNING").contains(&run_id));
    assert!(line("research").contains("succeeded") && line("research").contains("alpha"));
    assert!(line(" draft").contains("ready"));
    assert!(line("publish").contains("pending"));
    let listed = stdout_of(&cli(&tw, &["runs", "list", "--status", "running"]).await);
    assert!(listed.contains(&run_id), "{listed}");

    // `watch` redraws until the run ends: cancel it meanwhile.
    let admin = tw.admin();
    let watched_id = run_id.clone();
    let watcher = tokio::task::spawn_blocking(move || {
        warden()
            .args(["runs", "watch", &watched_id, "--admin-url", &admin])
            .env("WARDEN_TOKEN", OPERATOR_TOKEN)
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let cancelled =
        stdout_of(&cli(&tw, &["runs", "cancel", &run_id, "--reason", "wrong topic"]).await);
    assert!(
        cancelled.contains("CANCELLED") && cancelled.contains("wrong topic"),
        "{cancelled}"
    );
    let watched = tokio::time::timeout(Duration::from_secs(20), watcher)
        .await
        .expect("watch returns once the run ends")
        .unwrap();
    let watched = stdout_of(&watched);
    assert!(
        watched.contains("RUNNING") && watched.contains("CANCELLED"),
        "{watched}"
    );

    let json = stdout_of(
        &cli(
            &tw,
            &[
                "runs",
                "start",
                "brief",
                "-i",
                "topic=moons",
                "--format",
                "json",
            ],
        )
        .await,
    );
    let parsed: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(parsed["run_id"].as_str().unwrap().starts_with("run-"));
    assert!(parsed.get("estimated_cost_usd").is_some());

    // A new version, then history and rollback.
    let (before, _) = tw
        .edit_workflow(
            &flows,
            "brief",
            &DIAMOND.replace("Research {{", "Look into {{"),
        )
        .await;
    let history = stdout_of(&cli(&tw, &["workflows", "history", "brief"]).await);
    assert!(history.contains(&before), "{history}");
    assert_eq!(
        history.lines().filter(|l| l.contains('*')).count(),
        1,
        "one current version:\n{history}"
    );
    let rolled = stdout_of(&cli(&tw, &["workflows", "rollback", "brief", &before[..12]]).await);
    assert!(rolled.contains(&before), "{rolled}");
    assert_eq!(tw.workflow_version("brief").await, before);
    assert_eq!(
        tw.scalar("SELECT actor FROM audit_log WHERE kind = 'workflow_rollback'")
            .await
            .as_deref(),
        Some("olga")
    );
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insights_compare_versions_once_ten_runs_have_completed() {
    use crate::runs::{poll, script, start_run, step_call, with_flows};
    const SOLO: &str =
        "name = \"solo\"\n[[steps]]\nid = \"only\"\nagent = \"alpha\"\ninstructions = \"Do it.\"\n";
    let (mut tw, flows) = with_flows(&[("solo.toml", SOLO)], script).await;
    let quiet = stdout_of(&cli(&tw, &["insights"]).await);
    assert!(quiet.contains("No suggestions"), "{quiet}");
    let run_batch = |fail_every: usize| {
        let tw = &tw;
        async move {
            for i in 0..10 {
                start_run(tw, "solo", json!({})).await;
                let work = poll(tw, AGENT_KEY).await;
                let text = if fail_every > 0 && i % fail_every == 0 {
                    "FAIL"
                } else {
                    "REPLY=done"
                };
                step_call(tw, AGENT_KEY, &work[0], text).await;
            }
        }
    };
    run_batch(0).await;
    let (first, _) = tw
        .edit_workflow(&flows, "solo", &SOLO.replace("Do it.", "Do it now."))
        .await;
    // The new version fails every other run.
    run_batch(2).await;
    let out = stdout_of(&cli(&tw, &["insights"]).await);
    assert!(
        out.contains("workflow_stats") && out.contains("agent_step_stats"),
        "{out}"
    );
    let suggestion = out
        .lines()
        .find(|l| l.starts_with("suggestion:"))
        .unwrap_or_else(|| panic!("no suggestion in\n{out}"));
    assert!(
        suggestion.contains("succeeds in 50% of 10 runs")
            && suggestion.contains(&format!("rollback solo {}", &first[..12])),
        "{suggestion}"
    );
    let stats = tw
        .query(
            "SELECT version_hash, completed, success_rate FROM workflow_stats ORDER BY first_run",
        )
        .await;
    assert_eq!(stats.rows.len(), 2);
    assert_eq!(stats.rows[0][1].as_deref(), Some("10"));
    assert_eq!(stats.rows[1][2].as_deref(), Some("0.5"));
    tw.stop().await;
}
