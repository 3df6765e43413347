#!/usr/bin/env python3
"""Derives Warden's built-in price table from LiteLLM's public table.

Keeps the OpenAI and Anthropic models (chat, responses, completion and
embedding modes) and only the price fields Warden applies, with every number
copied as the text LiteLLM wrote (never through a float).

    python3 src/metering/builtin_prices.py ../shared/data/model_prices_and_context_window.json \
        > src/metering/builtin_prices.json
"""
import json
import re
import sys

FIELDS = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
    "input_cost_per_token_above_200k_tokens",
    "output_cost_per_token_above_200k_tokens",
    "cache_read_input_token_cost_above_200k_tokens",
    "cache_creation_input_token_cost_above_200k_tokens",
    "max_output_tokens",
]
MODES = {"chat", "responses", "completion", "embedding"}


class Raw(str):
    """A number kept as the exact text of the source file."""


def main(path):
    table = json.load(open(path), parse_float=Raw, parse_int=Raw)
    out = {}
    for name, entry in table.items():
        if not isinstance(entry, dict) or entry.get("litellm_provider") not in ("openai", "anthropic"):
            continue
        if entry.get("mode") not in MODES or "/" in name or "ft:" in name:
            continue
        if "input_cost_per_token" not in entry:
            continue
        out[name] = {k: entry[k] for k in FIELDS if k in entry and entry[k] is not None}
        out[name]["litellm_provider"] = entry["litellm_provider"]
    lines = ["{"]
    for i, name in enumerate(sorted(out)):
        fields = ", ".join(
            f'"{k}": "{v}"' if k == "litellm_provider" else f'"{k}": {v}'
            for k, v in out[name].items()
        )
        lines.append(f'  "{name}": {{{fields}}}' + ("," if i < len(out) - 1 else ""))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # the output must be valid JSON
    sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1])
