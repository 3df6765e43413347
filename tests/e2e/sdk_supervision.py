"""Approvals and halts as the official SDKs see them.

Environment: WARDEN_URL, WARDEN_ADMIN, WARDEN_TOKEN (an operator),
HELD_KEY (an agent whose every call needs approval), FREE_KEY (an agent
whose calls go straight through). Warden's approval timeout is a few
seconds. Prints one JSON object for the Rust test to check.
"""
import json
import os
import threading
import time

import anthropic
import openai

from http_json import send

BASE = os.environ["WARDEN_URL"]
ADMIN = os.environ["WARDEN_ADMIN"]
TOKEN = os.environ["WARDEN_TOKEN"]
HELD_KEY = os.environ["HELD_KEY"]
FREE_KEY = os.environ["FREE_KEY"]
MESSAGES = [{"role": "user", "content": "Summarise the governance report."}]
results = {}


def admin(method, path, body=None):
    return send(ADMIN + path, TOKEN, method, body)


def wait_pending(n, box=None):
    for _ in range(400):
        if box and "error" in box:
            raise RuntimeError(f"the held call failed instead: {box['error']!r}")
        _, listing = admin("GET", "/admin/v1/approvals")
        if len(listing["approvals"]) >= n:
            return [a["approval_id"] for a in listing["approvals"]]
        time.sleep(0.025)
    raise RuntimeError(f"{n} approvals never became pending: {listing} {box}")


def in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - the test reports what the SDK raised
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def error_of(e):
    return {"class": type(e).__name__, "status": getattr(e, "status_code", None), "message": str(e)}


held_oa = openai.OpenAI(base_url=BASE + "/v1", api_key=HELD_KEY, max_retries=0)
held_an = anthropic.Anthropic(base_url=BASE, api_key=HELD_KEY, max_retries=0)
free_oa = openai.OpenAI(base_url=BASE + "/v1", api_key=FREE_KEY, max_retries=0)
free_an = anthropic.Anthropic(base_url=BASE, api_key=FREE_KEY, max_retries=0)

# Held, approved while waiting: not streamed, then streamed.
thread, box = in_thread(lambda: held_oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
ids = wait_pending(1, box)
admin("POST", f"/admin/v1/approvals/{ids[0]}/approve", {"reason": "sdk test"})
thread.join()
results["approved"] = box["value"].choices[0].message.content if "value" in box else error_of(box["error"])


def stream_text():
    with held_an.messages.stream(model="claude-haiku-4-5", max_tokens=256, messages=MESSAGES) as stream:
        return "".join(stream.text_stream)


thread, box = in_thread(stream_text)
ids = wait_pending(1, box)
admin("POST", f"/admin/v1/approvals/{ids[0]}/approve", {})
thread.join()
results["approved_stream"] = box.get("value") or error_of(box["error"])

# Rejected: the SDK raises PermissionDeniedError with the operator's reason.
thread, box = in_thread(lambda: held_oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
ids = wait_pending(1, box)
admin("POST", f"/admin/v1/approvals/{ids[0]}/reject", {"reason": "not during the freeze"})
thread.join()
e = box.get("error")
results["rejected"] = {**error_of(e), "code": getattr(e, "code", None)} if e else None
status, body = admin("POST", f"/admin/v1/approvals/{ids[0]}/approve", {})
results["second_decision"] = {"status": status, "message": body["error"]["message"]}

# Nobody decides: approval_timeout.
try:
    held_oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "wait"}])
    results["timeout"] = None
except openai.PermissionDeniedError as e:
    results["timeout"] = {"status": e.status_code, "code": e.code}

# A halt cuts 50 live streams, half OpenAI, half Anthropic.
started = threading.Semaphore(0)


def openai_stream(i):
    stream = free_oa.chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": f"stream {i}"}]
    )
    chunks = 0
    for _ in stream:
        chunks += 1
        if chunks == 1:
            started.release()
    return chunks


def anthropic_stream(i):
    chunks = 0
    with free_an.messages.stream(
        model="claude-haiku-4-5", max_tokens=256, messages=[{"role": "user", "content": f"stream {i}"}]
    ) as stream:
        for _ in stream.text_stream:
            chunks += 1
            if chunks == 1:
                started.release()
    return chunks


streams = [in_thread(lambda i=i: (openai_stream if i % 2 else anthropic_stream)(i)) for i in range(50)]
for _ in range(50):
    if not started.acquire(timeout=30):
        raise RuntimeError("not every stream started")
status, _ = admin("POST", "/admin/v1/halts", {"scope": "agent:researcher", "reason": "cut by the sdk test"})
results["halt_status"] = status
raised = []
for thread, box in streams:
    thread.join()
    if "error" in box:
        raised.append(type(box["error"]).__name__ + ": " + str(box["error"]))
results["streams_raised"] = len(raised)
results["stream_errors"] = sorted(set(r.split(":")[0] for r in raised))
results["stream_error_mentions_reason"] = all("cut by the sdk test" in r for r in raised)

try:
    free_oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    results["after_halt"] = None
except openai.PermissionDeniedError as e:
    results["after_halt"] = {"status": e.status_code, "code": e.code}

status, _ = admin("POST", "/admin/v1/resume", {"scope": "agent:researcher"})
reply = free_oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
results["after_resume"] = bool(reply.choices[0].message.content)

print(json.dumps(results))
