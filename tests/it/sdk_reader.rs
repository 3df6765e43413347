//! The C SDK's JSON reader (plugins/sdk/c/warden.h), built into a probe
//! module with the shipped modules' flags and run in wasmtime, against
//! serde_json on generated documents: every member found where serde_json
//! finds it, nothing found where it does not, whatever the whitespace,
//! escapes and brackets inside strings, and no trap on truncated input.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use wasmtime::{Engine, Instance, Linker, Memory, Module, Store, TypedFunc};

/// Member names: some collide at different depths, some are prefixes of
/// others, some hold escaped quotes (never asked for: the reader compares
/// names as written).
const NAMES: &[&str] = &[
    "a",
    "b",
    "model",
    "mode",
    "models",
    "call",
    "config",
    "x y",
    "é",
    "{",
    "[]",
    "",
    "model\\\"x",
    "a\\\\",
];
/// Pieces of string values, raw JSON (escapes already written).
const PIECES: &[&str] = &[
    "hello",
    " ",
    "\\\"",
    "\\\\",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\\n",
    "é",
    "日本",
    "\\u00e9",
    "\\/",
    "\\\"model\\\":",
    "\\\\\\\"",
    "0123456789abcdef",
    "\\\"model\\\":1",
    "model",
];

struct Probe {
    store: Store<()>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    get: TypedFunc<(i32, i32), i64>,
    walk: TypedFunc<(i32, i32), i64>,
}

impl Probe {
    fn new(engine: &Engine, module: &Module) -> Probe {
        let mut store = Store::new(engine, ());
        let mut linker = Linker::new(engine);
        linker
            .func_wrap("warden", "log", |_: i32, _: i32| {})
            .unwrap();
        let instance: Instance = linker.instantiate(&mut store, module).unwrap();
        Probe {
            memory: instance.get_memory(&mut store, "memory").unwrap(),
            alloc: instance.get_typed_func(&mut store, "warden_alloc").unwrap(),
            get: instance.get_typed_func(&mut store, "probe_get").unwrap(),
            walk: instance.get_typed_func(&mut store, "probe_walk").unwrap(),
            store,
        }
    }

    /// Calls `func` on `path`, NUL, `json`; its packed (ptr, len) result.
    fn call(&mut self, which: &str, path: &str, json: &[u8]) -> Option<(usize, usize)> {
        let mut input = path.as_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(json);
        let ptr = self
            .alloc
            .call(&mut self.store, input.len() as i32)
            .unwrap();
        self.memory
            .write(&mut self.store, ptr as usize, &input)
            .unwrap();
        let func = if which == "get" {
            &self.get
        } else {
            &self.walk
        };
        let packed = func
            .call(&mut self.store, (ptr, input.len() as i32))
            .unwrap_or_else(|e| panic!("probe_{which} trapped on {path:?} in {json:?}: {e}"));
        (packed >= 0).then_some(((packed as u64 >> 32) as usize, packed as u32 as usize))
    }

    fn get(&mut self, path: &str, json: &[u8]) -> Option<(usize, usize)> {
        self.call("get", path, json)
    }

    /// (key range, value range) of each member or item at `path`.
    fn walk(&mut self, path: &str, json: &[u8]) -> Option<Vec<[u32; 4]>> {
        let (ptr, len) = self.call("walk", path, json)?;
        let mut bytes = vec![0u8; len];
        self.memory.read(&self.store, ptr, &mut bytes).unwrap();
        Some(
            bytes
                .chunks_exact(16)
                .map(|c| {
                    std::array::from_fn(|k| {
                        u32::from_le_bytes(c[k * 4..k * 4 + 4].try_into().unwrap())
                    })
                })
                .collect(),
        )
    }
}

fn ws(rng: &mut StdRng, text: &mut String) {
    const SPACES: &[&str] = &["", "", "", " ", "\n", "\t", "\r\n  ", "                 "];
    text.push_str(SPACES[rng.random_range(0..SPACES.len())]);
}

fn string(rng: &mut StdRng, text: &mut String) {
    text.push('"');
    for _ in 0..rng.random_range(0..6) {
        text.push_str(PIECES[rng.random_range(0..PIECES.len())]);
    }
    text.push('"');
}

fn value(rng: &mut StdRng, depth: u32, text: &mut String) {
    let kind = if depth >= 4 {
        rng.random_range(0..4)
    } else {
        rng.random_range(0..7)
    };
    match kind {
        0 => string(rng, text),
        1 => text.push_str(["0", "-12.5e3", "1764000000000", "0.0001680"][rng.random_range(0..4)]),
        2 => text.push_str(["true", "false", "null"][rng.random_range(0..3)]),
        3 => string(rng, text),
        4 | 5 => {
            text.push('{');
            let mut names: Vec<&str> = NAMES.to_vec();
            for i in 0..rng.random_range(0..6) {
                if i > 0 {
                    ws(rng, text);
                    text.push(',');
                }
                ws(rng, text);
                let name = names.swap_remove(rng.random_range(0..names.len()));
                text.push('"');
                text.push_str(name);
                text.push('"');
                ws(rng, text);
                text.push(':');
                ws(rng, text);
                value(rng, depth + 1, text);
            }
            ws(rng, text);
            text.push('}');
        }
        _ => {
            text.push('[');
            for i in 0..rng.random_range(0..5) {
                if i > 0 {
                    ws(rng, text);
                    text.push(',');
                }
                ws(rng, text);
                value(rng, depth + 1, text);
            }
            ws(rng, text);
            text.push(']');
        }
    }
}

/// Dotted paths through objects whose names read the same escaped or not.
fn paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (name, member) in map {
            if name.contains(['.', '"', '\\']) {
                continue;
            }
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            paths(member, &path, out);
            out.push(path);
        }
    }
}

fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(value, |at, name| at.as_object()?.get(name))
}

fn parse(text: &[u8]) -> Value {
    serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", String::from_utf8_lossy(text)))
}

#[test]
fn the_c_sdk_reads_json_as_serde_json_does() {
    if Command::new("clang").arg("--version").output().is_err() {
        panic!("clang is needed to build the SDK probe (.ci/run installs it)");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = tempfile::tempdir().unwrap();
    let status = Command::new(root.join("policies/build.sh"))
        .arg(out_dir.path())
        .arg(root.join("tests/it/sdk/json_probe.c"))
        .status()
        .unwrap();
    assert!(status.success(), "the probe does not build");
    let engine = Engine::default();
    let module = Module::from_file(&engine, out_dir.path().join("json_probe.wasm")).unwrap();

    let mut rng = StdRng::seed_from_u64(0x005e_ed0f_ca11);
    let (mut found, mut absent, mut walked) = (0, 0, 0);
    for round in 0..1500 {
        let mut text = String::new();
        ws(&mut rng, &mut text);
        // Mostly objects: paths start at one.
        let mut top = String::new();
        while !top.starts_with('{') {
            top.clear();
            value(&mut rng, 0, &mut top);
        }
        text.push_str(&top);
        ws(&mut rng, &mut text);
        let doc = text.as_bytes();
        let parsed = parse(doc);
        let mut probe = Probe::new(&engine, &module);

        let mut asked = Vec::new();
        paths(&parsed, "", &mut asked);
        for _ in 0..4 {
            let depth = rng.random_range(1..4);
            let names: Vec<&str> = (0..depth)
                .map(|_| NAMES[rng.random_range(0..NAMES.len())])
                .filter(|n| !n.contains(['"', '\\']))
                .collect();
            if !names.is_empty() {
                asked.push(names.join("."));
            }
        }
        for path in &asked {
            let got = probe.get(path, doc);
            match (lookup(&parsed, path), got) {
                (Some(expected), Some((at, len))) => {
                    assert_eq!(&parse(&doc[at..at + len]), expected, "{path:?} in {text:?}");
                    found += 1;
                }
                (None, None) => absent += 1,
                (expected, got) => {
                    panic!("{path:?} in {text:?}: serde_json has {expected:?}, the SDK {got:?}")
                }
            }
        }

        // Every object and array met, walked member by member.
        for path in std::iter::once(String::new()).chain(asked.iter().cloned()) {
            let Some(target) = (if path.is_empty() {
                Some(&parsed)
            } else {
                lookup(&parsed, &path)
            }) else {
                continue;
            };
            let got = probe.walk(&path, doc);
            match target {
                Value::Object(map) => {
                    let members: BTreeMap<String, Value> = got
                        .unwrap_or_else(|| panic!("no members at {path:?} in {text:?}"))
                        .iter()
                        .map(|m| {
                            let key = &doc[m[0] as usize..(m[0] + m[1]) as usize];
                            let key = parse(&[b"\"", key, b"\""].concat());
                            let value = parse(&doc[m[2] as usize..(m[2] + m[3]) as usize]);
                            (key.as_str().unwrap().to_owned(), value)
                        })
                        .collect();
                    assert_eq!(
                        &members.into_iter().collect::<serde_json::Map<_, _>>(),
                        map,
                        "{path:?} in {text:?}"
                    );
                    walked += 1;
                }
                Value::Array(items) => {
                    let got: Vec<Value> = got
                        .unwrap_or_else(|| panic!("no items at {path:?} in {text:?}"))
                        .iter()
                        .map(|m| parse(&doc[m[2] as usize..(m[2] + m[3]) as usize]))
                        .collect();
                    assert_eq!(&got, items, "{path:?} in {text:?}");
                    walked += 1;
                }
                _ => {}
            }
        }

        // Cut short, the document is malformed: the reader must stop, and
        // anything it finds must lie inside what it was given.
        if round % 3 == 0 {
            let mut probe = Probe::new(&engine, &module);
            for cut in (1..doc.len()).step_by(1 + doc.len() / 24) {
                for path in asked.iter().take(6) {
                    if let Some((at, len)) = probe.get(path, &doc[..cut]) {
                        assert!(
                            at + len <= cut,
                            "{path:?} found past the end of {:?}",
                            String::from_utf8_lossy(&doc[..cut])
                        );
                    }
                }
            }
        }
    }
    // The generator must have asked about both kinds, many times.
    assert!(
        found > 5_000 && absent > 1_000 && walked > 3_000,
        "found {found}, absent {absent}, walked {walked}"
    );
}
