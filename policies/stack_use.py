#!/usr/bin/env python3
"""How much of its stack each shipped module uses (policies/ABI.md: the
stack is put back after every evaluation, so it is kept small).

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install wasmtime
    /tmp/venv/bin/python policies/stack_use.py

Each module is instantiated (wasmtime's Python package), `warden_init` runs
with a config, the stack below the stack pointer is zeroed, and the module
evaluates inputs that take its deepest paths (denies that build a reason,
long values, messages with credentials). The lowest byte written below the
stack pointer tells how deep the stack went.
"""
import json
import os

import wasmtime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ENGINE = wasmtime.Engine()


def stack_use(path, config, inputs, entry="warden_evaluate"):
    store = wasmtime.Store(ENGINE)
    module = wasmtime.Module.from_file(ENGINE, path)
    log = wasmtime.Func(
        store,
        wasmtime.FuncType([wasmtime.ValType.i32(), wasmtime.ValType.i32()], []),
        lambda ptr, length: None,
    )
    instance = wasmtime.Instance(store, module, [log] if module.imports else [])
    exports = instance.exports(store)
    memory, alloc, main = exports["memory"], exports["warden_alloc"], exports[entry]

    def put(data):
        ptr = alloc(store, len(data))
        memory.write(store, data, ptr)
        return ptr, len(data)

    if "warden_init" in exports:
        exports["warden_init"](store, *put(config.encode()))
    top = exports["__stack_pointer"].value(store)
    memory.write(store, bytes(top), 0)
    for text in inputs:
        main(store, *put(text.encode()))
    below = bytes(memory.read(store, 0, top))
    lowest = next((at for at, byte in enumerate(below) if byte), top)
    return top - lowest, top


def call(**members):
    base = {"model": "gpt-4o", "role": "analyst", "agent": "a", "estimated_cost_usd": "0.5"}
    return json.dumps(
        {
            "call": dict(base, **members),
            "activity": {"calls_last_minute": 500, "errors_last_minute": 3},
            "budgets": [],
            "time": {"unix_ms": 1},
        }
    )


LONG = "x" * 3000
SECRET = json.dumps(
    {
        "call": {"model": "gpt-4o"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "AKIAIOSFODNN7EXAMPLE " + LONG}]},
            {"role": "user", "content": "-----BEGIN RSA PRIVATE KEY-----\nMIIE"},
        ],
    }
)
CHAT = json.dumps(
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "jane.doe@example.com +1 415 555 0100 " + LONG}]}
)
MODULES = [
    ("policies/cost_gate.wasm", '{"max_call_usd":0.1,"hard_max_usd":0.2}',
     [call(), call(estimated_cost_usd="0.15"), call(estimated_cost_usd="abc")], "warden_evaluate"),
    ("policies/model_allowlist.wasm", '{"analyst":["gpt-4o*","claude-*"],"*":["gpt-4o-mini"]}',
     [call(), call(model="llama" + LONG), call(role="x", model="gpt-5")], "warden_evaluate"),
    ("policies/runaway_guard.wasm", '{"max_calls_per_minute":100}', [call()], "warden_evaluate"),
    ("policies/secret_guard.wasm", "{}", [SECRET, call()], "warden_evaluate"),
    ("plugins/redact_pii.wasm", "{}", [CHAT], "warden_transform"),
]

for path, config, inputs, entry in MODULES:
    used, size = stack_use(os.path.join(ROOT, path), config, inputs, entry)
    print(f"{path:32s} {used:5d} of {size} stack bytes used")
