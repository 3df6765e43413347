//! The sandbox against modules that misbehave in every way the ABI allows,
//! and the shipped C policies against inputs they must decide.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn spec(name: &str, path: &str, kind: ModuleKind, config: &str) -> ModuleSpec {
    ModuleSpec {
        name: name.into(),
        kind,
        path: repo(path),
        fail: FailMode::Closed,
        timeout_ms: DEFAULT_TIMEOUT_MS,
        max_memory_mb: DEFAULT_MAX_MEMORY_MB,
        include_messages: true,
        config_json: config.into(),
    }
}

fn quiet() -> LoadObserver {
    Arc::new(|_| {})
}

/// Why a module was refused at load.
fn load_error(spec: ModuleSpec) -> String {
    match ModuleSet::load(&[spec], None, quiet()) {
        Ok(_) => panic!("the module loaded"),
        Err(error) => error.to_string(),
    }
}

fn set(specs: &[ModuleSpec]) -> ModuleSet {
    ModuleSet::load(specs, None, quiet()).unwrap()
}

fn policy(path: &str, config: &str) -> ModuleSet {
    set(&[spec("p", path, ModuleKind::Policy, config)])
}

const INPUT: &str = r#"{"call":{"call_id":"c1","agent":"alpha","role":"researcher","model":"gpt-4o","estimated_cost_usd":0.012},"activity":{"calls_last_minute":3,"errors_last_minute":0},"budgets":[],"run":null}"#;

fn decide_one(set: &ModuleSet, input: &str, messages: Option<&str>) -> Decision {
    let verdict = set.evaluate(input.as_bytes(), messages.map(str::as_bytes));
    assert_eq!(verdict.decisions.len(), 1);
    verdict.decisions.into_iter().next().unwrap()
}

#[test]
fn an_endless_loop_is_stopped_at_its_deadline_and_denied() {
    let set = policy("tests/wat/endless_loop.wat", "{}");
    assert!(!set.needs_blocking());
    // The test threads share two cores: a loop starved of CPU (5 ms of it
    // not had within 20 ms) is stopped by the wall-clock backstop instead,
    // a correct answer but not the one under test here; try again then.
    let mut attempts = 0_u64;
    let decision = loop {
        attempts += 1;
        let started = std::time::Instant::now();
        let decision = decide_one(&set, INPUT, None);
        assert!(started.elapsed() < Duration::from_secs(2));
        if !(decision.reason.contains("wall-clock") && attempts < 5) {
            break decision;
        }
    };
    assert_eq!(
        (decision.action, decision.rule.as_str()),
        (Action::Deny, POLICY_ERROR_RULE)
    );
    assert!(
        decision.reason.contains("5 ms CPU deadline"),
        "{}",
        decision.reason
    );
    assert!(
        set.needs_blocking(),
        "a module that overran moves off the workers"
    );
    let listing = &set.list()[0];
    assert_eq!(
        (listing.evaluations, listing.errors, listing.timeouts),
        (attempts, attempts, attempts)
    );
}

#[test]
fn a_memory_bomb_hits_its_cap() {
    let mut bomb = spec(
        "bomb",
        "tests/wat/memory_bomb.wat",
        ModuleKind::Policy,
        "{}",
    );
    bomb.max_memory_mb = 4;
    bomb.timeout_ms = 2_000;
    let set = set(&[bomb]);
    let decision = decide_one(&set, INPUT, None);
    assert_eq!(decision.action, Action::Deny);
    assert!(
        decision.reason.contains("4 MB memory cap"),
        "{}",
        decision.reason
    );
}

#[test]
fn a_wasi_import_is_refused_at_load_by_name() {
    let error = load_error(spec(
        "w",
        "tests/wat/wasi_import.wat",
        ModuleKind::Policy,
        "{}",
    ));
    assert!(error.contains("wasi_snapshot_preview1.fd_write"), "{error}");
    assert!(error.contains("WASI is not available"), "{error}");
}

#[test]
fn garbage_output_and_traps_fail_closed_or_open() {
    let decision = decide_one(&policy("tests/wat/garbage_output.wat", "{}"), INPUT, None);
    assert_eq!(decision.action, Action::Deny);
    assert!(
        decision.reason.contains("malformed decision"),
        "{}",
        decision.reason
    );
    assert!(
        decision.reason.contains("certainly!"),
        "{}",
        decision.reason
    );

    let mut open = spec("t", "tests/wat/trap.wat", ModuleKind::Policy, "{}");
    open.fail = FailMode::Open;
    let decision = decide_one(&set(&[open]), INPUT, None);
    assert_eq!(
        (decision.action, decision.rule.as_str()),
        (Action::Allow, POLICY_ERROR_RULE)
    );
    assert!(
        decision.error.as_deref().unwrap().contains("unreachable"),
        "{decision:?}"
    );
    assert!(!decision.is_plain_allow(), "a failure is always recorded");
}

#[test]
fn no_state_survives_from_one_evaluation_to_the_next() {
    let set = policy("tests/wat/stateful.wat", "{}");
    for _ in 0..3 {
        let decision = decide_one(&set, INPUT, None);
        assert_eq!(decision.action, Action::Allow, "{decision:?}");
    }
}

#[test]
fn a_kept_instance_is_put_back_after_every_evaluation() {
    let set = policy("tests/wat/stateful_exported.wat", "{}");
    let module = set.policies.load()[0].clone();
    assert!(
        module.sandbox.reuses_instances(),
        "every mutable global is exported"
    );
    let run = |input: &[u8]| {
        let (output, _) = module.sandbox.run(b"{}", &[input]);
        output.map(|bytes| String::from_utf8(bytes).unwrap())
    };
    // "g" grows the memory (that instance cannot be put back and is dropped),
    // "t" traps after counting (dropped too): each later run still sees no
    // earlier call, and warden_init's mark.
    for input in ["{}", "{}", "g", "{}", "t", "{}", "{}"] {
        match run(input.as_bytes()) {
            Ok(output) => assert!(output.contains("allow"), "after {input:?}: {output}"),
            Err(error) => assert_eq!(input, "t", "{error}"),
        }
    }
    // On other threads too, each with its own instance.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..50 {
                    assert!(run(b"{}").unwrap().contains("allow"));
                }
            });
        }
    });
}

#[test]
fn a_module_that_says_where_its_heap_ends_gets_only_the_memory_below_put_back() {
    let set = policy("tests/wat/heap_bounded.wat", "{}");
    let module = set.policies.load()[0].clone();
    assert!(module.sandbox.reuses_instances());
    // A thread of its own: a fresh kept instance, whatever ran before here.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let rules: Vec<String> = (0..4)
                .map(|_| {
                    let (output, _) = module.sandbox.run(b"{}", &[b"{}"]);
                    let output = String::from_utf8(output.unwrap()).unwrap();
                    let decision: serde_json::Value = serde_json::from_str(&output).unwrap();
                    assert_eq!(decision["action"], "allow", "{output}");
                    decision["rule"].as_str().unwrap().to_owned()
                })
                .collect();
            // Statics, the stack and the heap start afresh every time (no
            // deny); the count above the heap is the module's own affair.
            assert_eq!(
                rules,
                ["", "above_heap_kept", "above_heap_kept", "above_heap_kept"]
            );
        });
    });
}

#[test]
fn inputs_of_any_length_leave_nothing_behind_in_a_kept_instance() {
    let set = policy("tests/wat/input_tail.wat", "{}");
    let module = set.policies.load()[0].clone();
    assert!(module.sandbox.reuses_instances());
    let tail = |input: &[u8]| {
        let mut expected = input.to_vec();
        expected.extend_from_slice(b"\0\0\0\0\0\0\0X");
        expected
    };
    // A thread of its own: its kept instance is set up by the first input
    // here, whose length sizes the input buffer (a few hundred bytes more).
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let long = vec![b'A'; 40];
            let longer_than_the_buffer = vec![b'C'; 4000];
            let inputs: [&[&[u8]]; 5] = [
                &[&long],
                &[b"B", b"B"],
                &[&longer_than_the_buffer],
                &[b"DD"],
                &[&long[..20], &long[20..]],
            ];
            for pieces in inputs {
                let (output, _) = module.sandbox.run(b"{}", pieces);
                assert_eq!(output.unwrap(), tail(&pieces.concat()), "{pieces:?}");
            }
        });
    });
}

#[test]
fn only_modules_whose_whole_state_the_host_can_restore_keep_an_instance() {
    let wat = |text: &str| engine::reusable(&wat::parse_str(text).unwrap());
    for shipped in [
        "policies/cost_gate.wasm",
        "policies/model_allowlist.wasm",
        "policies/runaway_guard.wasm",
        "policies/secret_guard.wasm",
        "plugins/redact_pii.wasm",
    ] {
        let bytes = std::fs::read(repo(shipped)).unwrap();
        assert!(
            engine::reusable(&bytes),
            "{shipped} exports its stack pointer"
        );
        let module = wasmtime::Module::new(&wasmtime::Engine::default(), &bytes).unwrap();
        for bound in ["__heap_base", "wd_heap_next"] {
            assert!(
                module.get_export(bound).is_some(),
                "{shipped} exports {bound}: only the memory below its heap is put back"
            );
        }
    }
    let stateful = std::fs::read_to_string(repo("tests/wat/stateful.wat")).unwrap();
    assert!(!wat(&stateful), "a mutable global the host cannot reach");
    assert!(wat(
        "(module (memory (export \"memory\") 1) (global (export \"g\") (mut i32) (i32.const 0)))"
    ));
    assert!(!wat(
        "(module (memory 1) (table 1 funcref) (func (table.set (i32.const 0) (ref.null func))))"
    ));
    assert!(!wat(
        "(module (memory 1) (data \"x\") (func (data.drop 0)))"
    ));
    assert!(!wat("(module)"), "no memory");
}

#[test]
fn modules_of_another_abi_or_without_exports_are_refused() {
    let error = load_error(spec(
        "v",
        "tests/wat/wrong_abi.wat",
        ModuleKind::Policy,
        "{}",
    ));
    assert!(error.contains("ABI v2"), "{error}");
    // A policy module offered as a plugin lacks warden_transform.
    let error = load_error(spec(
        "x",
        "tests/wat/allow_all.wat",
        ModuleKind::Plugin,
        "{}",
    ));
    assert!(error.contains("warden_transform"), "{error}");
}

#[test]
fn warden_init_receives_the_config() {
    let decision = decide_one(
        &policy("tests/wat/echo_config.wat", r#"{"max":1}"#),
        INPUT,
        None,
    );
    assert_eq!(decision.reason, "ok");
    let decision = decide_one(&policy("tests/wat/echo_config.wat", "{}"), INPUT, None);
    assert_eq!(decision.reason, "none");
}

#[test]
fn the_most_restrictive_action_wins_and_plain_allows_are_not_recorded() {
    let set = set(&[
        spec("allow", "tests/wat/allow_all.wat", ModuleKind::Policy, "{}"),
        spec(
            "gate",
            "policies/cost_gate.wasm",
            ModuleKind::Policy,
            r#"{"max_call_usd":1}"#,
        ),
        spec("deny", "tests/wat/deny_all.wat", ModuleKind::Policy, "{}"),
    ]);
    let verdict = set.evaluate(INPUT.as_bytes(), None);
    let (action, decisive) = verdict.outcome();
    assert_eq!(action, Action::Deny);
    assert_eq!(&*decisive.unwrap().policy, "deny");
    assert_eq!(
        verdict.to_record().count(),
        3,
        "a refused call records every decision"
    );

    let set = ModuleSet::load(
        &[
            spec("allow", "tests/wat/allow_all.wat", ModuleKind::Policy, "{}"),
            spec(
                "gate",
                "policies/cost_gate.wasm",
                ModuleKind::Policy,
                r#"{"max_call_usd":1}"#,
            ),
        ],
        None,
        quiet(),
    )
    .unwrap();
    let verdict = set.evaluate(INPUT.as_bytes(), None);
    let recorded: Vec<_> = verdict.to_record().map(|d| &*d.policy).collect();
    assert_eq!(
        recorded,
        ["allow"],
        "cost_gate's plain allow is not recorded"
    );
}

#[test]
fn cost_gate_asks_for_approval_then_denies() {
    let set = policy(
        "policies/cost_gate.wasm",
        r#"{"max_call_usd":0.01,"hard_max_usd":0.05}"#,
    );
    let decide = |cost: &str| decide_one(&set, &INPUT.replace("0.012", cost), None);
    assert_eq!(decide("0.005").action, Action::Allow);
    let approval = decide("0.012");
    assert_eq!(
        (approval.action, approval.rule.as_str()),
        (Action::RequireApproval, "max_call_usd")
    );
    assert!(approval.reason.contains("$0.012"), "{}", approval.reason);
    let denied = decide("0.06");
    assert_eq!(
        (denied.action, denied.rule.as_str()),
        (Action::Deny, "hard_max_usd")
    );
    // An unpriced model is left to the budgets.
    assert_eq!(decide("null").action, Action::Allow);
}

#[test]
fn model_allowlist_reads_roles_and_globs() {
    let config = r#"{"researcher":["gpt-4o*","claude-*"],"*":["gpt-4o-mini"]}"#;
    let set = policy("policies/model_allowlist.wasm", config);
    let decide = |role: &str, model: &str| {
        decide_one(
            &set,
            &INPUT.replace("researcher", role).replace("gpt-4o", model),
            None,
        )
    };
    assert_eq!(
        decide("researcher", "gpt-4o-2024-08-06").action,
        Action::Allow
    );
    assert_eq!(
        decide("researcher", "claude-sonnet-4-5").action,
        Action::Allow
    );
    let denied = decide("researcher", "o3");
    assert_eq!(
        (denied.action, denied.rule.as_str()),
        (Action::Deny, "model_not_allowed")
    );
    assert!(denied.reason.contains("`o3`"), "{}", denied.reason);
    assert_eq!(decide("intern", "gpt-4o-mini").action, Action::Allow);
    assert_eq!(decide("intern", "gpt-4o").action, Action::Deny);
    let strict = policy(
        "policies/model_allowlist.wasm",
        r#"{"researcher":["gpt-*"]}"#,
    );
    let denied = decide_one(&strict, &INPUT.replace("researcher", "intern"), None);
    assert_eq!(denied.rule, "role_not_listed");
}

#[test]
fn the_c_sdk_skips_strings_with_escapes_at_every_alignment() {
    // The SDK looks for a string's end 8 bytes at a time: a quote or a
    // backslash at any offset in a word, escaped quotes and backslashes, and
    // text that looks like the member the policy wants must all be skipped.
    let set = policy(
        "policies/model_allowlist.wasm",
        r#"{"researcher":["gpt-4o*"]}"#,
    );
    for pad in 0..20 {
        for tricky in [
            r#"\""#,
            r#"\\"#,
            r#"\\\""#,
            r#"x\",\"role\":\"intern\""#,
            "\u{e9}\u{2014}",
        ] {
            let call_id = format!("{}{tricky}{}", "a".repeat(pad), "b".repeat(pad % 9));
            let input = INPUT.replace(r#""c1""#, &format!("\"{call_id}\""));
            assert!(
                serde_json::from_str::<serde_json::Value>(&input).is_ok(),
                "{input}"
            );
            let allowed = decide_one(&set, &input, None);
            assert_eq!(allowed.action, Action::Allow, "{input}: {}", allowed.reason);
            let denied = decide_one(&set, &input.replace("gpt-4o", "o3"), None);
            assert_eq!(
                denied.rule, "model_not_allowed",
                "{input}: {}",
                denied.reason
            );
        }
    }
}

#[test]
fn runaway_guard_halts_an_agent_above_its_rate() {
    let set = policy(
        "policies/runaway_guard.wasm",
        r#"{"max_calls_per_minute":3}"#,
    );
    assert_eq!(decide_one(&set, INPUT, None).action, Action::Allow);
    let decision = decide_one(
        &set,
        &INPUT.replace("\"calls_last_minute\":3", "\"calls_last_minute\":4"),
        None,
    );
    assert_eq!(
        (decision.action, decision.rule.as_str()),
        (Action::HaltAgent, "max_calls_per_minute")
    );
    assert!(
        decision.reason.contains("`alpha` made 4 calls"),
        "{}",
        decision.reason
    );
}

#[test]
fn secret_guard_finds_keys_and_credentials_in_messages_only() {
    let set = policy("policies/secret_guard.wasm", "{}");
    let with = |text: &str| {
        let members = format!(
            r#","messages":[{{"role":"user","content":{}}}]"#,
            serde_json::to_string(text).unwrap()
        );
        decide_one(&set, INPUT, Some(&members))
    };
    assert_eq!(with("summarise this report please").action, Action::Allow);
    for (text, rule) in [
        (
            "key: -----BEGIN RSA PRIVATE KEY-----\nMIIE...",
            "private_key",
        ),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
        ("use AKIAIOSFODNN7EXAMPLE to log in", "aws_access_key"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG",
            "aws_secret_key",
        ),
        (
            "key=AIzaSyA1234567890abcdefghijklmnopqrstuv",
            "google_api_key",
        ),
        (
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abc==",
            "azure_key",
        ),
        (
            "token ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "github_token",
        ),
    ] {
        let decision = with(text);
        assert_eq!(
            (decision.action, decision.rule.as_str()),
            (Action::Deny, rule),
            "{text}"
        );
    }
    // AKIA followed by too few characters is not a key id.
    assert_eq!(with("AKIA123").action, Action::Allow);
}

#[test]
fn redact_pii_masks_addresses_and_numbers_in_text_only() {
    let set = set(&[spec(
        "r",
        "plugins/redact_pii.wasm",
        ModuleKind::Plugin,
        "{}",
    )]);
    // Written out by hand: the second message has \u escapes next to an
    // address, which a match must not cut into.
    let body = r#"{"model":"gpt-4o-2024-08-06","user":"ops@example.com","messages":[
        {"role":"user","content":"Mail jane.doe+q@corp.example.co.uk or call +1 415 555 0100, (415) 555-0199 or 020 7946 0958.\nOrder 1741569952 stays."},
        {"role":"user","content":[{"type":"text","text":"\u00e9\u00e9bob@x.io\n"}]}],
        "max_tokens":1234567890}"#;
    let out = set.transform(body.as_bytes()).unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
    assert_eq!(out["model"], "gpt-4o-2024-08-06");
    assert_eq!(
        out["user"], "ops@example.com",
        "only message text is redacted"
    );
    assert_eq!(out["max_tokens"], 1234567890);
    assert_eq!(
        out["messages"][0]["content"],
        "Mail [email] or call [phone], [phone] or [phone].\nOrder 1741569952 stays."
    );
    assert_eq!(out["messages"][1]["content"][0]["text"], "éé[email]\n");
    // Nothing to redact: the body is left as it was.
    let clean = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;
    assert!(set.transform(clean).unwrap().body.is_none());
}

#[test]
fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.wasm");
    std::fs::copy(repo("tests/wat/allow_all.wat"), &path).unwrap();
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    let observer: LoadObserver = Arc::new(move |event| {
        let line = match event {
            LoadEvent::Loaded { name, .. } => format!("loaded {name}"),
            LoadEvent::Refused { name, error, .. } => format!("refused {name}: {error}"),
        };
        seen.lock().unwrap().push(line);
    });
    let mut p = spec("p", "unused", ModuleKind::Policy, "{}");
    p.path = path.clone();
    let set = ModuleSet::load(&[p], None, observer).unwrap();
    let first = set.list()[0].sha256.clone();
    assert_eq!(decide_one(&set, INPUT, None).action, Action::Allow);

    // Same length and maybe the same mtime second: write a different size.
    std::fs::write(
        &path,
        std::fs::read(repo("tests/wat/deny_all.wat")).unwrap(),
    )
    .unwrap();
    set.reload_changed();
    assert_eq!(decide_one(&set, INPUT, None).action, Action::Deny);
    assert_ne!(set.list()[0].sha256, first);

    std::fs::write(&path, b"(module (import \"env\" \"f\" (func)))").unwrap();
    set.reload_changed();
    assert_eq!(
        decide_one(&set, INPUT, None).action,
        Action::Deny,
        "the previous version serves"
    );
    set.reload_changed();
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[1].contains("`env.f`"), "{events:?}");

    let sha = set
        .deploy(
            "p",
            &std::fs::read(repo("tests/wat/allow_all.wat")).unwrap(),
            "olga",
        )
        .unwrap();
    assert_eq!(sha, first);
    assert_eq!(decide_one(&set, INPUT, None).action, Action::Allow);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(repo("tests/wat/allow_all.wat")).unwrap()
    );
    assert!(matches!(
        set.deploy("nope", b"", "olga"),
        Err(PolicyError::Unknown(_))
    ));
}

#[test]
fn compiled_modules_are_cached_by_hash_across_restarts() {
    let cache = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(repo("policies/cost_gate.wasm")).unwrap();
    let first = WasmRuntime::new(Some(cache.path().to_owned())).unwrap();
    let sha = first.compile(&bytes).unwrap().sha256;
    let cached: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(
        cached[0].starts_with(&sha) && cached[0].ends_with(".cwasm"),
        "{cached:?}"
    );
    drop(first);

    // A new engine (a restart) loads the precompiled file; a corrupt one is
    // compiled afresh rather than trusted.
    let second = WasmRuntime::new(Some(cache.path().to_owned())).unwrap();
    let module = second.compile(&bytes).unwrap();
    assert_eq!(module.sha256, sha);
    assert!(module.module.get_export("warden_evaluate").is_some());
    let path = cache.path().join(&cached[0]);
    std::fs::write(&path, b"garbage").unwrap();
    let third = WasmRuntime::new(Some(cache.path().to_owned())).unwrap();
    assert!(third.compile(&bytes).is_ok());
}

#[test]
fn the_sdk_constant_allow_reads_as_a_parsed_plain_allow() {
    // cost_gate under its limits answers with wd_allow()'s constant bytes,
    // read without a parse; heap_bounded's allow goes through serde.
    let constant = decide_one(
        &policy("policies/cost_gate.wasm", r#"{"max_call_usd":1.0}"#),
        INPUT,
        None,
    );
    let parsed = decide_one(&policy("tests/wat/heap_bounded.wat", "{}"), INPUT, None);
    for decision in [&constant, &parsed] {
        assert!(decision.is_plain_allow(), "{decision:?}");
    }
    let fields = |d: &Decision| {
        (
            d.action,
            d.rule.clone(),
            d.reason.clone(),
            d.annotations.clone(),
            d.error.clone(),
        )
    };
    assert_eq!(fields(&constant), fields(&parsed));
}
