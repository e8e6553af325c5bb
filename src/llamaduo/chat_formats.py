"""The structured-output fields of a chat-completions request: `response_format`, `tools`,
`tool_choice`, `parallel_tool_calls`, `logprobs` / `top_logprobs`.

Each parser raises `FieldError` naming the field (`chat_api` turns it into a 400), and
`grammar_spec` says what the grammar engine must enforce for the request:

- `response_format` `json_object`: any JSON object; `json_schema`: JSON of its `schema`
  (`strict: true` also forbids properties the schema does not list);
- `tool_choice` `required`: one or more calls (one if `parallel_tool_calls` is false) to offered
  functions, arguments valid against their `parameters`; a named function: one call to it;
- `auto`: the model may call or answer; with a JSON `response_format`, either is enforced;
- `none`: tools are neither shown to the model nor read from its answer.
"""

from __future__ import annotations

import re
from typing import Any

from llamaduo.grammar import GrammarError, GrammarSpec, canonical, check_schema

MAX_TOP_LOGPROBS = 20
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NO_PARAMETERS: dict[str, Any] = {"type": "object"}


class FieldError(ValueError):
    """A request field with a value this server refuses; `param` is its path (`tools[0].function.name`)."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"{param} {reason}")
        self.param, self.reason = param, reason


def _schema(schema: Any, param: str) -> dict[str, Any]:
    try:
        check_schema(schema)
    except GrammarError as e:
        raise FieldError(param, str(e)) from None
    return schema


def parse_response_format(value: Any) -> tuple[dict[str, Any], bool] | None:
    """(schema, strict) the answer must be JSON of, or None for free text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError("response_format", "must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, False
    if kind != "json_schema":
        raise FieldError("response_format.type", f"{kind!r} is not supported (text, json_object or json_schema)")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise FieldError("response_format.json_schema", "must be an object with a schema")
    if "schema" not in spec:
        raise FieldError("response_format.json_schema.schema", "is required")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FieldError("response_format.json_schema.strict", "must be a boolean")
    return _schema(spec["schema"], "response_format.json_schema.schema"), bool(strict)


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """The offered functions, normalised to `{"type": "function", "function": {name, description, parameters}}`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError("tools", "must be a list of function tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise FieldError(f"tools[{i}].type", "must be 'function' (the only tool type this server runs)")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise FieldError(f"tools[{i}].function", "must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise FieldError(f"tools[{i}].function.name", "must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise FieldError(f"tools[{i}].function.name", f"{name!r} is offered twice")
        seen.add(name)
        params = fn.get("parameters")
        params = NO_PARAMETERS if params is None else _schema(params, f"tools[{i}].function.parameters")
        function: dict[str, Any] = {"name": name}
        if isinstance(fn.get("description"), str):
            function["description"] = fn["description"]
        function["parameters"] = params
        out.append({"type": "function", "function": function})
    return out


def parse_tool_choice(value: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(none | auto | required | function, the named function or None)."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise FieldError("tool_choice", "'required' needs tools")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function":
        name = (value.get("function") or {}).get("name") if isinstance(value.get("function"), dict) else None
        if name not in {t["function"]["name"] for t in tools}:
            raise FieldError("tool_choice.function.name", f"{name!r} is not one of the offered tools")
        return "function", name
    if isinstance(value, dict):
        raise FieldError("tool_choice.type", f"{value.get('type')!r} is not supported (a function, or none/auto/required)")
    raise FieldError("tool_choice", "must be 'none', 'auto', 'required' or a named function")


def parse_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    """(logprobs, top_logprobs)."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise FieldError("logprobs", "must be a boolean")
    top = body.get("top_logprobs")
    if top is None:
        return bool(logprobs), 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise FieldError("top_logprobs", f"must be an integer between 0 and {MAX_TOP_LOGPROBS}")
    if not logprobs:
        raise FieldError("top_logprobs", "needs logprobs: true")
    return True, top


def grammar_spec(
    response_format: tuple[dict[str, Any], bool] | None,
    tools: list[dict[str, Any]],
    tool_choice: str,
    tool_name: str | None,
    parallel: bool,
) -> GrammarSpec | None:
    """What the grammar engine enforces for a request, or None for free text."""
    schema, strict = (canonical(response_format[0]), response_format[1]) if response_format else (None, True)
    offered = tuple(
        (t["function"]["name"], canonical(t["function"]["parameters"]))
        for t in tools
        if tool_choice != "function" or t["function"]["name"] == tool_name
    )
    if tool_choice in ("required", "function"):
        return GrammarSpec(tools=offered, tools_required=True, parallel=parallel and tool_choice == "required")
    if tool_choice == "auto" and offered and schema is not None:
        return GrammarSpec(schema=schema, strict=strict, tools=offered, parallel=parallel)
    if schema is not None:
        return GrammarSpec(schema=schema, strict=strict)
    return None
