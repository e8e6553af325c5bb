"""Reading JSON out of LLM replies, the strict-schema form of a pydantic model, and the repair prompt."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError


def extract_json(text: str) -> Any:
    """Parse JSON from an LLM reply: plain, inside ``` fences, or the first {...} in prose."""
    t = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", t, re.S)
    if fence:
        t = fence.group(1).strip()
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        pass
    start = t.find("{")
    if start < 0:
        raise ValueError("no JSON object in the reply")
    obj, _ = json.JSONDecoder().raw_decode(t[start:])
    return obj


def parse_reply(text: str, schema: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    """(parsed, None) or (None, one-line reason). Only a reply that is not JSON or does not fit
    `schema` is a reason; any other exception (a bug in a validator, say) propagates."""
    try:
        return schema.model_validate(extract_json(text)), None
    except (ValueError, ValidationError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"invalid JSON for {schema.__name__}: {msg}"


def strict_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the form strict structured output accepts: every object
    closed (`additionalProperties: false`) and every property listed as required."""

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    out = schema.model_json_schema()
    close(out)
    return out


def repair_messages(messages: list[dict[str, str]], bad_reply: str, reason: str) -> list[dict[str, str]]:
    """The conversation that asks again with the bad reply in view (a new cache key, too)."""
    return [
        *messages,
        {"role": "assistant", "content": bad_reply[:4000]},
        {"role": "user", "content": f"That reply was not valid JSON for the required format ({reason}). Reply with the JSON object only."},
    ]
