"""Drives a running Warden with the official OpenAI and Anthropic SDKs.

Environment: WARDEN_URL (http://host:port), WARDEN_AGENT_KEY.
Prints one JSON object: what each call returned, for the Rust test to check
against the store.
"""
import json
import os
import sys

import anthropic
import openai

BASE = os.environ["WARDEN_URL"]
KEY = os.environ["WARDEN_AGENT_KEY"]
results = {}

oa = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0)
an = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0)

# Chat, not streamed, with Warden's headers read through the raw response.
raw = oa.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
)
chat = raw.parse()
results["chat"] = {
    "text": chat.choices[0].message.content,
    "prompt_tokens": chat.usage.prompt_tokens,
    "completion_tokens": chat.usage.completion_tokens,
    "call_id": raw.headers.get("x-warden-call-id"),
    "cost": raw.headers.get("x-warden-cost-usd"),
}

# Chat, streamed, without asking for usage: no usage chunk may appear.
chunks = list(
    oa.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "Stream please"}]
    )
)
results["chat_stream"] = {
    "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "chunks_without_choices": sum(1 for c in chunks if not c.choices),
    "usage_seen": any(getattr(c, "usage", None) for c in chunks),
}

# Chat, streamed, asking for usage: the usage chunk is there.
chunks = list(
    oa.chat.completions.create(
        model="gpt-4o-mini",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Stream with usage"}],
    )
)
results["chat_stream_usage"] = {"usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None}

# Responses API, both ways.
resp = oa.responses.create(model="gpt-4.1", input="Responses, not streamed")
results["responses"] = {"text": resp.output_text, "input_tokens": resp.usage.input_tokens}
events = list(oa.responses.create(model="gpt-4.1", input="Responses, streamed", stream=True))
results["responses_stream"] = {
    "types": sorted({e.type for e in events}),
    "completed_usage": events[-1].response.usage.output_tokens,
}

# Anthropic Messages, both ways, and count_tokens.
msg = an.messages.create(
    model="claude-sonnet-4-5", max_tokens=256, messages=[{"role": "user", "content": "Hello Claude"}]
)
results["messages"] = {"text": msg.content[0].text, "input_tokens": msg.usage.input_tokens, "output_tokens": msg.usage.output_tokens}
with an.messages.stream(
    model="claude-haiku-4-5", max_tokens=256, messages=[{"role": "user", "content": "Stream, Claude"}]
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
results["messages_stream"] = {"text": text, "output_tokens": final.usage.output_tokens}
count = an.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "count me"}])
results["count_tokens"] = {"input_tokens": count.input_tokens}

# Refusals arrive as the SDKs' own exception types.
errors = {}
try:
    openai.OpenAI(base_url=BASE + "/v1", api_key="wk_wrong", max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}]
    )
except openai.AuthenticationError as e:
    errors["openai_bad_key"] = e.status_code
try:
    anthropic.Anthropic(base_url=BASE, api_key="wk_wrong", max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
except anthropic.AuthenticationError as e:
    errors["anthropic_bad_key"] = e.status_code
try:
    oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as e:
    errors["openai_unknown_model"] = e.status_code
try:
    # An OpenAI model asked for in Anthropic's format: refused, not translated.
    an.messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "x"}])
except anthropic.BadRequestError as e:
    errors["anthropic_bad_request"] = e.status_code
results["errors"] = errors

json.dump(results, sys.stdout)
