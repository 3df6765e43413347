"""A workflow run driven by agents that use the official SDKs unchanged.

The operator starts the sample workflow (research_brief) through the admin
API. The researcher polls for work and calls with OpenAI's SDK, passing the
step headers Warden handed out (as client default headers for `research`,
as per-request extra headers on a stream for `fact_check`). The writer
polls and calls Anthropic's SDK, streaming, with no Warden headers at all:
Warden binds the call to its only running step. The operator approves the
gate; Warden sends the publish step itself.

Environment: WARDEN_URL, WARDEN_ADMIN, WARDEN_TOKEN, RESEARCHER_KEY,
WRITER_KEY. Prints one JSON object for the Rust test to check.
"""
import json
import os
import time

import anthropic
import openai

from http_json import send

BASE = os.environ["WARDEN_URL"]
ADMIN = os.environ["WARDEN_ADMIN"]
TOKEN = os.environ["WARDEN_TOKEN"]
RESEARCHER_KEY = os.environ["RESEARCHER_KEY"]
WRITER_KEY = os.environ["WRITER_KEY"]
results = {"work": {}}


def call(url, key, method="GET", body=None):
    status, answer = send(url, key, method, body)
    assert status < 400, f"{method} {url}: {status} {answer}"
    return answer


def poll(key, step):
    for _ in range(200):
        for item in call(BASE + "/v1/warden/work", key)["work"]:
            if item["step_id"] == step:
                results["work"][step] = item
                return item
        time.sleep(0.025)
    raise SystemExit(f"no work {step} offered")


def run_view(run_id):
    return call(f"{ADMIN}/admin/v1/runs/{run_id}", TOKEN)["run"]


started = call(ADMIN + "/admin/v1/runs", TOKEN, "POST",
               {"workflow": "research_brief", "inputs": {"topic": "tide tables"}})
run_id = started["run_id"]
results["run_id"] = run_id

# research: the step headers as the OpenAI client's default headers.
item = poll(RESEARCHER_KEY, "research")
researcher = openai.OpenAI(base_url=BASE + "/v1", api_key=RESEARCHER_KEY,
                           default_headers=item["headers"])
answer = researcher.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": item["instructions"]}])
results["research_answer"] = answer.choices[0].message.content

# draft: Anthropic's SDK, streaming, no Warden headers.
item = poll(WRITER_KEY, "draft")
writer = anthropic.Anthropic(base_url=BASE, api_key=WRITER_KEY)
with writer.messages.stream(model="claude-sonnet-4-5", max_tokens=400,
                            messages=[{"role": "user", "content": item["instructions"]}]) as stream:
    results["draft_answer"] = stream.get_final_text()

# fact_check: a plain OpenAI client, the headers on this one streamed request.
item = poll(RESEARCHER_KEY, "fact_check")
plain = openai.OpenAI(base_url=BASE + "/v1", api_key=RESEARCHER_KEY)
pieces = []
for chunk in plain.chat.completions.create(
        model="gpt-4o-mini", stream=True, extra_headers=item["headers"],
        messages=[{"role": "user", "content": item["instructions"]}]):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
results["fact_check_answer"] = "".join(pieces)

# The operator approves the gate once it is open.
for _ in range(200):
    gate = next(s for s in run_view(run_id)["steps"] if s["step_id"] == "approve")
    if gate.get("approval_id"):
        call(f"{ADMIN}/admin/v1/approvals/{gate['approval_id']}/approve", TOKEN, "POST",
             {"reason": "ship it"})
        break
    time.sleep(0.025)

for _ in range(400):
    run = run_view(run_id)
    if run["status"] != "running":
        break
    time.sleep(0.025)
results["run"] = run
print(json.dumps(results))
