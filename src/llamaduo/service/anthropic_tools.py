"""OpenAI's structured request fields and tool turns in the shapes of Anthropic's Messages API, and back.

- `tools` `[{type: function, function: {name, description, parameters, strict}}]` become
  `[{name, description, input_schema, strict}]`;
- `tool_choice` auto / none / required / `{function: {name}}` becomes `{type: auto / none / any /
  tool + name}`, and `parallel_tool_calls: false` its `disable_parallel_tool_use: true`;
- `response_format` json_schema becomes one more tool, named after the schema, whose
  `input_schema` is the schema: forced, or (beside tools the model may call, under auto) one of
  the tools it must call. Its call's input is the reply's content, as JSON text, not a call.
  json_object is the same with the schema `{"type": "object"}`: a tool's input is always a JSON
  object, which is all json_object promises. text needs nothing;
- history: an assistant turn's `tool_calls` become `tool_use` blocks (input: the parsed
  arguments), `tool` turns `tool_result` blocks of a user turn; neighbouring turns of one role
  then merge, as the API wants roles to alternate;
- the reply: text blocks are the content, `tool_use` blocks `<tool_call>` blocks, the one text
  form of a call (as `OpenAIProvider` writes OpenAI's `tool_calls`).

What has no equivalent (another tool type, a non-object schema, a tool_choice with no tools) is an
`UnsupportedField` naming it, never dropped.
"""

from __future__ import annotations

import json
from typing import Any

from llamaduo.data import TOOL_CALL_SEPARATOR, tool_call_text
from llamaduo.service.api import UnsupportedField
from llamaduo.service.retry import ServiceFault

PROVIDER = "anthropic"
FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
JSON_TOOL = "json_tool"  # params key: the tool whose input is a response format's answer
JSON_OBJECT_TOOL = "json_object"
ANSWER_NOTE = "Give your whole answer as this tool's input."


def _refuse(field: str, why: str) -> UnsupportedField:
    return UnsupportedField(field, PROVIDER, why)


def _object_schema(schema: Any, field: str) -> dict[str, Any]:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _refuse(field, "Anthropic's tool input_schema must be an object schema")
    return schema


def _tool(i: int, tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise _refuse(f"tools[{i}]", "only named function tools map onto Anthropic's tools")
    extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if extra:
        raise _refuse(f"tools[{i}].function.{extra[0]}", "it has no Anthropic equivalent")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    out = {"name": fn["name"], "input_schema": _object_schema(params, f"tools[{i}].function.parameters")}
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("strict") is True:  # only when asked: older models refuse the field
        out["strict"] = True
    return out


def _answer_tool(fmt: Any) -> dict[str, Any] | None:
    """The tool a response format's answer comes through, or None for free text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":  # llama.cpp's form may carry a schema too
        schema = _object_schema(fmt.get("schema") or {"type": "object"}, "response_format.schema")
        return {"name": JSON_OBJECT_TOOL, "description": ANSWER_NOTE, "input_schema": schema}
    if kind != "json_schema":
        raise _refuse("response_format", f"type {kind!r} has no Anthropic equivalent")
    spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else {}
    name = spec.get("name") or "response"
    tool = {"name": name, "description": spec.get("description") or ANSWER_NOTE,
            "input_schema": _object_schema(spec.get("schema"), "response_format.json_schema.schema")}
    if spec.get("strict") is True:
        tool["strict"] = True
    return tool


def _choice(choice: Any, parallel: bool | None) -> dict[str, Any]:
    if choice == "none":
        return {"type": "none"}  # no calls: nothing to run in parallel
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance((choice.get("function") or {}).get("name"), str):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _refuse("tool_choice", f"{choice!r} has no Anthropic equivalent")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def request_params(fields: dict[str, Any]) -> dict[str, Any]:
    """The Messages API's `tools` / `tool_choice` for an application's OpenAI fields, plus
    `JSON_TOOL` when a response format's answer comes through a tool. Part of the cache key."""
    for name in fields:
        if name not in FIELDS:
            raise _refuse(name, "it is not mapped onto the Messages API")
    offered = fields.get("tools") or []
    if not isinstance(offered, list):
        raise _refuse("tools", "must be a list of function tools")
    tools = [_tool(i, t) for i, t in enumerate(offered)]
    choice, parallel = fields.get("tool_choice"), fields.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _refuse("parallel_tool_calls", "must be a boolean")
    answer = _answer_tool(fields.get("response_format"))
    # Under required or a named function the answer is a call, which a response format does not shape.
    if answer is not None and (not tools or choice in (None, "auto", "none")):
        if answer["name"] in {t["name"] for t in tools}:
            raise _refuse("response_format", f"its name {answer['name']!r} is also a tool's")
        if tools and choice != "none":  # call a tool or answer: one of the tools, the answer among them
            forced = {"type": "any", **({"disable_parallel_tool_use": True} if parallel is False else {})}
        else:  # one answer, exactly
            forced = {"type": "tool", "name": answer["name"], "disable_parallel_tool_use": True}
        return {"tools": [*tools, answer], "tool_choice": forced, JSON_TOOL: answer["name"]}
    if tools:
        return {"tools": tools, "tool_choice": _choice(choice, parallel)}
    if choice not in (None, "none", "auto"):
        raise _refuse("tool_choice", "no tools are offered")
    return {}


def _tool_use(i: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        args = None
    if not isinstance(args, dict):  # a request we cannot send: not retried
        raise ServiceFault("invalid_request", f"messages[{i}].tool_calls[{j}].function.arguments is not a JSON "
                           "object, which Anthropic's tool_use input must be")
    return {"type": "tool_use", "id": call.get("id") or f"call_{i}_{j}", "name": fn.get("name"), "input": args}


def _blocks(content: Any) -> list[dict[str, Any]]:
    return content if isinstance(content, list) else [{"type": "text", "text": content}] if content else []


def turns(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(system text, the other turns in Anthropic's shape): OpenAI-shaped turns, tool turns included."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] == "tool":
            result = {"type": "tool_result", "tool_use_id": m["tool_call_id"]}
            turn: dict[str, Any] = {"role": "user", "content": [{**result, "content": m["content"]} if m.get("content")
                                                                 else result]}
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [_tool_use(i, j, c) for j, c in enumerate(m["tool_calls"])]
            turn = {"role": "assistant", "content": [*_blocks(m.get("content")), *calls]}
        else:
            turn = {"role": m["role"], "content": m["content"]}
        prev = out[-1] if out else None
        # Plain neighbours stay as they were sent; where blocks are involved, one turn per role.
        if prev and prev["role"] == turn["role"] and (isinstance(prev["content"], list) or isinstance(turn["content"], list)):
            prev["content"] = [*_blocks(prev["content"]), *_blocks(turn["content"])]
        else:
            out.append(turn)
    return system, out


def reply_text(blocks: list[Any], json_tool: str | None = None) -> str:
    """The reply as text: its text, then each `tool_use` as a `<tool_call>` block; under a response
    format, the answer tool's input as JSON text instead of the text."""
    texts, calls, answer = [], [], None
    for b in blocks:
        kind = getattr(b, "type", None)
        if kind == "text":
            texts.append(b.text)
        elif kind == "tool_use" and json_tool is not None and b.name == json_tool:
            answer = json.dumps(b.input, ensure_ascii=False)
        elif kind == "tool_use":
            calls.append(tool_call_text(b.name, b.input))
    if json_tool is not None and answer is None and not calls:
        raise ServiceFault("malformed", f"Malformed: the reply did not answer through the {json_tool!r} tool "
                           "(the response format's answer)")
    # A note before a forced answer is not part of the JSON the application asked for.
    text = answer if answer is not None else "".join(texts)
    return TOOL_CALL_SEPARATOR.join([text, *calls] if text else calls)
