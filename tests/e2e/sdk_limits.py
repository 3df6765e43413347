"""Rate limits and budgets as the official SDKs see them.

Environment: WARDEN_URL; WARDEN_LIMITED_KEY (an agent with a small
requests_per_minute); WARDEN_BROKE_KEY (an agent whose budget is spent).
Prints one JSON object for the Rust test to check.
"""
import json
import os
import time

import anthropic
import openai

BASE = os.environ["WARDEN_URL"]
LIMITED = os.environ["WARDEN_LIMITED_KEY"]
BROKE = os.environ["WARDEN_BROKE_KEY"]
results = {}
MESSAGES = [{"role": "user", "content": "One line, please."}]


def chat(client):
    return client.chat.completions.create(model="gpt-4o-mini", max_tokens=16, messages=MESSAGES)


def message(client):
    return client.messages.create(model="claude-3-haiku-20240307", max_tokens=16, messages=MESSAGES)


def rate_headers(response):
    names = ["retry-after", "retry-after-ms", "x-ratelimit-limit-requests",
             "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]
    return {name: response.headers.get(name) for name in names}


# Use up the limited agent's burst without retries: the SDK raises its own
# RateLimitError from Warden's 429.
oa = openai.OpenAI(base_url=BASE + "/v1", api_key=LIMITED, max_retries=0)
admitted = 0
refusal = None
while refusal is None and admitted < 100:
    try:
        chat(oa)
        admitted += 1
    except openai.RateLimitError as e:
        refusal = e
results["openai_admitted_before_429"] = admitted
results["openai_429"] = {
    "status": refusal.status_code,
    "code": refusal.code,
    "headers": rate_headers(refusal.response),
}

# With retries on, the SDK waits what retry-after says and gets through.
started = time.monotonic()
chat(openai.OpenAI(base_url=BASE + "/v1", api_key=LIMITED, max_retries=3))
results["openai_retry_waited_s"] = time.monotonic() - started

an = anthropic.Anthropic(base_url=BASE, api_key=LIMITED, max_retries=0)
try:
    message(an)
    results["anthropic_429"] = None
except anthropic.RateLimitError as e:
    results["anthropic_429"] = {
        "status": e.status_code,
        "type": e.body["error"]["type"] if isinstance(e.body, dict) else None,
        "headers": rate_headers(e.response),
    }
started = time.monotonic()
message(anthropic.Anthropic(base_url=BASE, api_key=LIMITED, max_retries=3))
results["anthropic_retry_waited_s"] = time.monotonic() - started

# An exhausted budget: 429 budget_exceeded, and the SDK does not retry it
# even with retries on (x-should-retry: false).
try:
    chat(openai.OpenAI(base_url=BASE + "/v1", api_key=BROKE, max_retries=3))
    results["budget"] = None
except openai.RateLimitError as e:
    results["budget"] = {
        "status": e.status_code,
        "code": e.code,
        "message": e.message,
        "retry_after": e.response.headers.get("retry-after"),
    }
try:
    message(anthropic.Anthropic(base_url=BASE, api_key=BROKE, max_retries=3))
    results["budget_anthropic"] = None
except anthropic.RateLimitError as e:
    results["budget_anthropic"] = {"status": e.status_code}

print(json.dumps(results))
