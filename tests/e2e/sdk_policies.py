"""Policies as the official SDKs see them.

Environment: WARDEN_URL, WARDEN_KEY (an agent whose calls meet a cost_gate
with a tiny hard limit). Prints one JSON object for the Rust test to check.
"""
import json
import os

import anthropic
import openai

BASE = os.environ["WARDEN_URL"]
KEY = os.environ["WARDEN_KEY"]
results = {}
MESSAGES = [{"role": "user", "content": "Call me at +1 415 555 0100, please."}]

oa = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=2)
reply = oa.chat.completions.create(model="gpt-4o-mini", max_tokens=16, messages=MESSAGES)
results["openai_allowed"] = bool(reply.choices[0].message.content)
chunks = list(oa.chat.completions.create(model="gpt-4o-mini", max_tokens=16, messages=MESSAGES, stream=True))
results["openai_stream_chunks"] = len(chunks)
try:
    oa.chat.completions.create(model="gpt-4o-mini", max_tokens=100000, messages=MESSAGES)
    results["openai_denied"] = None
except openai.PermissionDeniedError as e:
    results["openai_denied"] = {"status": e.status_code, "code": e.code, "message": e.message}

an = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=2)
try:
    # 16 000 output tokens may cost $0.02 (the SDK refuses larger non-streamed asks itself).
    an.messages.create(model="claude-3-haiku-20240307", max_tokens=16000, messages=MESSAGES)
    results["anthropic_denied"] = None
except anthropic.PermissionDeniedError as e:
    results["anthropic_denied"] = {"status": e.status_code, "type": e.body["error"]["type"], "message": e.body["error"]["message"]}

print(json.dumps(results))
