//! Rate limits and budgets over real sockets: concurrency, restarts,
//! runtime changes, alerts and the official SDKs' view of a 429.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use toml::Spanned;

use crate::common::*;
use warden::config::{Amount, BudgetConfig};
use warden::money::Usd;

/// The chat fixture bills 19 input and 10 output tokens: at gpt-4o's list
/// price that is $0.0001475 a call.
const CALL_COST: &str = "0.0001475";
/// 48 bytes (an input bound of 24 tokens) and 10 output tokens at most: it
/// reserves $0.00016, 8.5 % above what it costs.
const SMALL_CALL: &str = r#"{"model":"gpt-4o","max_tokens":10,"messages":[]}"#;
const SMALL_CALL_BOUND: &str = "0.00016";

fn chat_fixture() -> Reply {
    Reply::json(fixture("openai/chat_completion.json"))
}

fn usd(text: &str) -> Usd {
    Usd::parse(text).unwrap()
}

fn with(extra: &str) -> Options {
    Options {
        extra: extra.to_owned(),
        ..Options::default()
    }
}

async fn budgets(tw: &TestWarden) -> Vec<Value> {
    let answer = tw
        .admin_request(Method::GET, "/admin/v1/budgets", Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["budgets"].as_array().unwrap().clone()
}

fn budget<'a>(all: &'a [Value], scope: &str, period: &str) -> &'a Value {
    all.iter()
        .find(|b| b["scope"] == scope && b["period"] == period)
        .unwrap_or_else(|| panic!("no budget {scope} per {period} in {all:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_calls_never_overshoot_a_budget_that_fits_fifty() {
    let limit = usd(CALL_COST).times(50);
    let tw = TestWarden::start_with(
        with(&format!(
            "[[budgets]]\nscope = \"global\"\nlimit_usd = \"{limit}\"\nperiod = \"day\"\n"
        )),
        |_| chat_fixture(),
    )
    .await;
    let tw = Arc::new(tw);
    let calls = (0..200).map(|_| {
        let tw = tw.clone();
        tokio::spawn(async move { tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await })
    });
    let answers: Vec<Answer> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let admitted = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    for refused in answers.iter().filter(|a| a.status != StatusCode::OK) {
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            refused.text()
        );
        assert_eq!(refused.json()["error"]["code"], "budget_exceeded");
        assert_eq!(
            refused.header("retry-after"),
            None,
            "a spent budget gives no retry-after"
        );
        assert_eq!(refused.header("x-should-retry").as_deref(), Some("false"));
    }
    assert!(admitted >= 45, "only {admitted} of 200 calls were admitted");
    assert!(
        admitted <= 50,
        "{admitted} calls admitted: the budget fits 50"
    );

    let spent = Usd::parse(
        &tw.scalar("SELECT CAST(sum(cost_usd) AS VARCHAR) FROM calls WHERE outcome = 'ok'")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(spent <= limit, "spent {spent} of a {limit} limit");
    assert_eq!(spent, usd(CALL_COST).times(admitted as u64));
    let refused_rows = tw
        .scalar(
            "SELECT count(*) FROM calls WHERE outcome = 'budget_exceeded' AND status_code = 429",
        )
        .await
        .unwrap();
    assert_eq!(refused_rows, (200 - admitted).to_string());
    let status = budgets(&tw).await;
    let global = budget(&status, "global", "day");
    assert_eq!(global["spent_usd"], spent.to_string());
    assert_eq!(
        global["reserved_usd"], "0",
        "every reservation was settled or released"
    );
}

#[tokio::test]
async fn every_budget_that_counts_a_call_must_admit_it_and_the_tightest_is_reported() {
    let per_call = usd(CALL_COST);
    let tw = TestWarden::start_with(
        with(&format!(
            "[[budgets]]\nscope = \"agent:alpha\"\nlimit_usd = \"{}\"\nperiod = \"day\"\n\n[[budgets]]\nscope = \"global\"\nlimit_usd = \"1\"\nperiod = \"month\"\n\n[[budgets]]\nscope = \"model:gpt-4o\"\nlimit_usd = \"1\"\nperiod = \"total\"\n\n[[budgets]]\nscope = \"model:local-*\"\nlimit_usd = \"1\"\nperiod = \"total\"\n",
            // Two calls fit: the second's reservation needs its bound.
            per_call + usd(SMALL_CALL_BOUND)
        )),
        |_| chat_fixture(),
    )
    .await;
    let first = tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(
        first.header("x-warden-cost-usd").as_deref(),
        Some(CALL_COST)
    );
    assert_eq!(
        first.header("x-warden-budget-remaining").as_deref(),
        Some(SMALL_CALL_BOUND),
        "the agent's budget is the tightest"
    );
    tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await;
    let refused = tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("agent:alpha (day)") && message.contains("spent $0.000295"),
        "{message}"
    );
    // The other agent only meets the global and model budgets.
    let other = tw
        .post("/v1/chat/completions", OTHER_AGENT_KEY, SMALL_CALL)
        .await;
    assert_eq!(other.status, StatusCode::OK);
    let status = budgets(&tw).await;
    assert_eq!(
        budget(&status, "global", "month")["spent_usd"],
        per_call.times(3).to_string()
    );
    assert_eq!(
        budget(&status, "model:gpt-4o", "total")["spent_usd"],
        per_call.times(3).to_string()
    );
    assert_eq!(
        budget(&status, "agent:alpha", "day")["remaining_usd"],
        "0.0000125"
    );

    // A model without a price cannot be held to a budget: refused, not free.
    let unpriced = tw
        .post(
            "/v1/chat/completions",
            OTHER_AGENT_KEY,
            r#"{"model":"local-llama","messages":[]}"#,
        )
        .await;
    assert_eq!(
        unpriced.status,
        StatusCode::FORBIDDEN,
        "{}",
        unpriced.text()
    );
    assert_eq!(unpriced.json()["error"]["code"], "model_not_priced");
    assert_eq!(
        tw.upstream.requests().len(),
        3,
        "refused calls never reach the upstream"
    );
}

#[tokio::test]
async fn spend_is_rebuilt_from_the_store_at_start_within_each_period() {
    let mut tw = TestWarden::start_with(
        with("[[budgets]]\nscope = \"agent:alpha\"\nlimit_usd = \"1\"\nperiod = \"day\"\n\n[[budgets]]\nscope = \"agent:alpha\"\nlimit_usd = \"1\"\nperiod = \"total\"\n"),
        |_| chat_fixture(),
    )
    .await;
    for _ in 0..3 {
        let answer = tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let three = usd(CALL_COST).times(3).to_string();
    tw.restart().await;
    let status = budgets(&tw).await;
    assert_eq!(budget(&status, "agent:alpha", "day")["spent_usd"], three);
    assert_eq!(budget(&status, "agent:alpha", "total")["spent_usd"], three);

    // Move one call to two days ago: the day's spend no longer counts it,
    // the total budget still does.
    tw.stop().await;
    let path = tw.store_path();
    tokio::task::spawn_blocking(move || {
        let conn = duckdb::Connection::open(path).unwrap();
        conn.execute_batch(
            "UPDATE calls SET ts_start = ts_start - INTERVAL 2 DAY WHERE call_id = (SELECT min(call_id) FROM calls)",
        )
        .unwrap();
    })
    .await
    .unwrap();
    tw.restart().await;
    let status = budgets(&tw).await;
    assert_eq!(
        budget(&status, "agent:alpha", "day")["spent_usd"],
        usd(CALL_COST).times(2).to_string()
    );
    assert_eq!(budget(&status, "agent:alpha", "total")["spent_usd"], three);
}

#[tokio::test]
async fn operators_change_budgets_and_limits_at_runtime_and_the_change_survives_restart() {
    let mut tw = TestWarden::start_with(
        with(&format!(
            "[[budgets]]\nscope = \"agent:alpha\"\nlimit_usd = \"{SMALL_CALL_BOUND}\"\nperiod = \"day\"\n"
        )),
        |_| chat_fixture(),
    )
    .await;
    assert_eq!(
        tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL)
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let change = json!({"scope": "agent:alpha", "limit_usd": "0.01"});
    let refused = tw
        .admin_request(
            Method::POST,
            "/admin/v1/budgets",
            Some(READONLY_TOKEN),
            Some(change.clone()),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let bad = tw
        .admin_request(
            Method::POST,
            "/admin/v1/budgets",
            Some(OPERATOR_TOKEN),
            Some(json!({"scope": "agent:nobody", "limit_usd": "1"})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text().contains("nobody"), "{}", bad.text());
    let changed = tw
        .admin_request(
            Method::POST,
            "/admin/v1/budgets",
            Some(OPERATOR_TOKEN),
            Some(change),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.text());
    assert_eq!(changed.json()["created"], false);
    assert_eq!(
        tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL)
            .await
            .status,
        StatusCode::OK
    );

    // A new budget and a rate limit, added at runtime.
    let added = tw
        .admin_request(
            Method::POST,
            "/admin/v1/budgets",
            Some(OPERATOR_TOKEN),
            Some(
                json!({"scope": "global", "limit_usd": 5, "period": "week", "on_exceed": "alert"}),
            ),
        )
        .await;
    assert_eq!(added.json()["created"], true, "{}", added.text());
    let limited = tw
        .admin_request(
            Method::POST,
            "/admin/v1/limits",
            Some(OPERATOR_TOKEN),
            Some(json!({"scope": "agent:beta", "requests_per_minute": 1})),
        )
        .await;
    assert_eq!(limited.status, StatusCode::OK, "{}", limited.text());

    tw.restart().await;
    let status = budgets(&tw).await;
    let alpha = budget(&status, "agent:alpha", "day");
    assert_eq!(alpha["limit_usd"], "0.01");
    assert_eq!(alpha["spent_usd"], usd(CALL_COST).times(2).to_string());
    assert_eq!(budget(&status, "global", "week")["on_exceed"], "alert");
    assert_eq!(
        tw.post("/v1/chat/completions", OTHER_AGENT_KEY, SMALL_CALL)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        tw.post("/v1/chat/completions", OTHER_AGENT_KEY, SMALL_CALL)
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS,
        "beta's runtime limit of 1 request a minute survived the restart"
    );
    let who = tw
        .query("SELECT operator, scope FROM budget_changes UNION ALL SELECT operator, scope FROM limit_changes ORDER BY scope")
        .await;
    assert_eq!(who.rows.len(), 3);
    assert!(who.rows.iter().all(|r| r[0].as_deref() == Some("olga")));
    let audited = tw
        .scalar("SELECT count(*) FROM audit_log WHERE actor = 'olga' AND kind IN ('budget_set', 'limit_set')")
        .await;
    assert_eq!(audited.as_deref(), Some("3"));
}

#[tokio::test]
async fn request_limits_answer_429_with_the_headers_sdks_read_in_both_formats() {
    let tw = TestWarden::start(|seen| {
        if seen.path.ends_with("/messages") {
            Reply::json(fixture("anthropic/message.json"))
        } else {
            chat_fixture()
        }
    })
    .await;
    let set = tw
        .admin_request(
            Method::POST,
            "/admin/v1/limits",
            Some(OPERATOR_TOKEN),
            Some(json!({"scope": "agent:alpha", "requests_per_minute": 2})),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());
    for _ in 0..2 {
        assert_eq!(
            tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL)
                .await
                .status,
            StatusCode::OK
        );
    }
    let refused = tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(
        error["message"].as_str().unwrap().contains("agent:alpha"),
        "{error}"
    );
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let retry_ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(retry_ms <= retry_after * 1000 && retry_ms > (retry_after - 1) * 1000);
    assert_eq!(
        refused.header("x-ratelimit-limit-requests").as_deref(),
        Some("2")
    );
    assert_eq!(
        refused.header("x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    assert!(
        refused
            .header("x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s')
    );

    let anthropic = tw
        .post(
            "/v1/messages",
            AGENT_KEY,
            r#"{"model":"claude-3-haiku-20240307","max_tokens":10,"messages":[]}"#,
        )
        .await;
    assert_eq!(anthropic.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(anthropic.json()["type"], "error");
    assert_eq!(anthropic.json()["error"]["type"], "rate_limit_error");
    assert!(anthropic.header("retry-after").is_some());

    // Other agents are not limited; refusals are recorded.
    assert_eq!(
        tw.post("/v1/chat/completions", OTHER_AGENT_KEY, SMALL_CALL)
            .await
            .status,
        StatusCode::OK
    );
    let recorded = tw
        .scalar("SELECT count(*) FROM calls WHERE outcome = 'rate_limited' AND agent = 'alpha' AND status_code = 429")
        .await;
    assert_eq!(recorded.as_deref(), Some("2"));
}

#[tokio::test]
async fn token_limits_charge_the_upper_bound_and_correct_it_after_the_call() {
    let tw = TestWarden::start_with(
        with("[[limits.models]]\nmodel = \"gpt-4o\"\ntokens_per_minute = 100\n"),
        |_| chat_fixture(),
    )
    .await;
    // 49 bytes (25 tokens at most) + max_tokens 35 = 60 tokens charged.
    let call = r#"{"model":"gpt-4o","max_tokens":35,"messages":[]}"#;
    let too_big = tw
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            r#"{"model":"gpt-4o","max_tokens":500,"messages":[]}"#,
        )
        .await;
    assert_eq!(
        too_big.status,
        StatusCode::BAD_REQUEST,
        "{}",
        too_big.text()
    );
    assert_eq!(
        too_big.json()["error"]["code"],
        "request_exceeds_token_limit"
    );
    assert_eq!(
        tw.post("/v1/chat/completions", AGENT_KEY, call)
            .await
            .status,
        StatusCode::OK
    );
    // The call used 29 tokens, not 60: the second fits only because the
    // first call's charge was corrected.
    assert_eq!(
        tw.post("/v1/chat/completions", AGENT_KEY, call)
            .await
            .status,
        StatusCode::OK
    );
    let refused = tw.post("/v1/chat/completions", AGENT_KEY, call).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert_eq!(
        refused.header("x-ratelimit-limit-tokens").as_deref(),
        Some("100")
    );
    let remaining: u64 = refused
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!((42..60).contains(&remaining), "{remaining}");
    // Other models are not limited.
    let mini = tw
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            r#"{"model":"gpt-4o-mini","max_tokens":5000,"messages":[]}"#,
        )
        .await;
    assert_eq!(mini.status, StatusCode::OK);
}

#[tokio::test]
async fn crossing_thresholds_alerts_once_and_posts_to_the_webhook_with_retries() {
    let posts = Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (posts2, attempts2) = (posts.clone(), attempts.clone());
    // The webhook refuses its first post, then takes everything.
    let hook = FakeUpstream::start(move |seen| {
        if attempts2.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::status(503, Bytes::from_static(b"{}"));
        }
        posts2.lock().unwrap().push(seen.body.clone());
        Reply::json(Bytes::from_static(b"{\"ok\":true}"))
    })
    .await;
    // Four calls fit: the fourth's reservation (its upper bound) needs the
    // last $0.000015 above four calls' cost.
    let limit = usd("0.000605");
    let tw = TestWarden::start_with(
        with(&format!(
            "[[budgets]]\nscope = \"agent:alpha\"\nlimit_usd = \"{limit}\"\nperiod = \"day\"\n\n[alerts]\nwebhook = \"{}/hooks/warden\"\n",
            hook.url()
        )),
        |_| chat_fixture(),
    )
    .await;
    for expected in [200, 200, 200, 200, 429, 429] {
        let answer = tw.post("/v1/chat/completions", AGENT_KEY, SMALL_CALL).await;
        assert_eq!(answer.status.as_u16(), expected, "{}", answer.text());
    }
    let rules = tw
        .query("SELECT rule, severity, subject FROM alerts ORDER BY ts")
        .await;
    let rules: Vec<_> = rules.rows.iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(
        rules,
        ["budget_50", "budget_80", "budget_100"],
        "each threshold once"
    );
    let audited = tw
        .scalar("SELECT count(*) FROM audit_log WHERE kind = 'alert'")
        .await;
    assert_eq!(audited.as_deref(), Some("3"));

    // Delivery is retried with backoff off the request path.
    for _ in 0..100 {
        if tw
            .scalar("SELECT count(*) FROM alerts WHERE delivered")
            .await
            .as_deref()
            == Some("3")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tw.scalar("SELECT count(*) FROM alerts WHERE delivered")
            .await
            .as_deref(),
        Some("3")
    );
    let posts = posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 3);
    let first: Value = serde_json::from_slice(&posts[0]).unwrap();
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .contains("agent:alpha (day)"),
        "{first}"
    );
    assert_eq!(first["warden"]["rule"], "budget_50");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "one refused attempt, then three posts"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_wait_as_told_by_a_rate_limit_and_do_not_retry_a_spent_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, gateway) = crate::e2e_sdk::sim_gateway(dir.path(), |config| {
        // The writer may make 30 calls a minute: one every two seconds.
        let writer = config
            .agents
            .iter_mut()
            .find(|a| a.name.get_ref() == "writer")
            .unwrap();
        writer.requests_per_minute = Some(Spanned::new(0..0, 30));
        config.budgets.push(BudgetConfig {
            scope: Spanned::new(0..0, "agent:researcher".into()),
            limit_usd: Spanned::new(0..0, Amount::Text("0.0000001".into())),
            period: Spanned::new(0..0, "day".into()),
            on_exceed: None,
        });
    })
    .await;
    let results = crate::e2e_sdk::run_sdk_script(
        "sdk_limits.py",
        vec![
            ("WARDEN_URL", format!("http://{}", gateway.proxy_addr())),
            ("WARDEN_LIMITED_KEY", warden::demo::WRITER_KEY.to_owned()),
            ("WARDEN_BROKE_KEY", warden::demo::RESEARCHER_KEY.to_owned()),
        ],
    )
    .await;

    let admitted = results["openai_admitted_before_429"].as_u64().unwrap();
    assert!(
        (30..=32).contains(&admitted),
        "the burst is 30 calls: {results}"
    );
    let openai = &results["openai_429"];
    assert_eq!(openai["status"], 429);
    assert_eq!(openai["code"], "rate_limit_exceeded");
    assert_eq!(openai["headers"]["x-ratelimit-limit-requests"], "30");
    assert_eq!(openai["headers"]["x-ratelimit-remaining-requests"], "0");
    let told: f64 = openai["headers"]["retry-after-ms"]
        .as_str()
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1000.0;
    // The SDK slept for what it was told (it may sleep a little longer).
    let waited = results["openai_retry_waited_s"].as_f64().unwrap();
    assert!(
        waited >= told * 0.9,
        "the SDK waited {waited} s, told {told} s"
    );
    let anthropic = &results["anthropic_429"];
    assert_eq!(anthropic["status"], 429, "{results}");
    assert_eq!(anthropic["type"], "rate_limit_error");
    let told: f64 = anthropic["headers"]["retry-after-ms"]
        .as_str()
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1000.0;
    assert!(results["anthropic_retry_waited_s"].as_f64().unwrap() >= told * 0.9);

    assert_eq!(results["budget"]["status"], 429);
    assert_eq!(results["budget"]["code"], "budget_exceeded");
    assert!(
        results["budget"]["message"]
            .as_str()
            .unwrap()
            .contains("agent:researcher (day)")
    );
    assert_eq!(results["budget"]["retry_after"], Value::Null);
    assert_eq!(results["budget_anthropic"]["status"], 429);

    gateway.flush().await;
    let reader = gateway.reader().clone();
    let rows = tokio::task::spawn_blocking(move || {
        reader
            .query(
                "SELECT agent, outcome, count(*) FROM calls GROUP BY ALL ORDER BY ALL",
                100,
            )
            .unwrap()
            .rows
    })
    .await
    .unwrap();
    let count = |agent: &str, outcome: &str| {
        rows.iter()
            .find(|r| r[0].as_deref() == Some(agent) && r[1].as_deref() == Some(outcome))
            .and_then(|r| r[2].clone())
            .unwrap_or_else(|| "0".into())
    };
    assert_eq!(
        count("researcher", "budget_exceeded"),
        "2",
        "one refusal per SDK call: x-should-retry kept the SDKs from retrying"
    );
    assert_eq!(count("writer", "ok"), (admitted + 2).to_string());
    assert!(count("writer", "rate_limited").parse::<u32>().unwrap() >= 2);
    gateway.shutdown().await;
}
