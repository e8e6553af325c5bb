"""A structured task's shape: what its examples must be, and what decoding enforces for them.

An example may carry what its application sends with the request (`tools`, `tool_choice`,
`parallel_tool_calls`, `response_format`, see `data.Example`). This module reads those fields
with the very parsers `serve` applies to a request (`chat_formats`), so a coverage file is held
to the contract the served model answers under:

- `check(example)`: every problem as (field, message): a schema that is not valid JSON Schema
  (or cannot be enforced), a tool call to a function that is not offered, arguments that do not
  validate against its parameters, a reference answer that is not JSON of the response schema;
- `spec(example)`: the `GrammarSpec` inference decodes under — the same one `serve` builds for
  the same request;
- `answer_problem(example, text)`: why a generated answer (a synthetic pair's target) does not
  fit the task, or None.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llamaduo.chat_formats import (
    FieldError,
    grammar_spec,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
)
from llamaduo.data import Example
from llamaduo.grammar import GrammarSpec, canonical
from llamaduo.tools import parse_tool_calls


@functools.lru_cache(maxsize=1024)
def _validator(schema_text: str) -> Any:
    from jsonschema.validators import validator_for

    schema = json.loads(schema_text)
    return validator_for(schema)(schema)


def _validate(instance: Any, schema: dict[str, Any]) -> str | None:
    """The first reason `instance` is not valid for `schema` (JSON Schema), or None."""
    error = next(iter(_validator(canonical(schema)).iter_errors(instance)), None)
    if error is None:
        return None
    at = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" (at {at})" if at else "")


def parsed(example: Example) -> tuple[tuple[dict[str, Any], bool] | None, list[dict[str, Any]], str, str | None]:
    """(response schema and strict, offered tools, tool choice, named function); raises FieldError."""
    fmt = parse_response_format(example.response_format)
    tools = parse_tools(example.tools)
    choice, name = parse_tool_choice(example.tool_choice, tools)
    return fmt, tools, choice, name


def check(example: Example) -> list[tuple[str | None, str]]:
    """Every problem of an example's structure, as (field, message)."""
    try:
        fmt, tools, choice, name = parsed(example)
    except FieldError as e:
        return [(e.param, e.reason)]
    problems: list[tuple[str | None, str]] = []
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for i, m in enumerate(example.messages):
        for j, call in enumerate(m.tool_calls or []):
            where = f"messages[{i}].tool_calls[{j}].function"
            if call.function.name not in params:
                offered = ", ".join(sorted(params)) or "none"
                problems.append((f"{where}.name", f"{call.function.name!r} is not an offered tool (offered: {offered})"))
                continue
            try:
                args = json.loads(call.function.arguments)
            except ValueError as e:
                problems.append((f"{where}.arguments", f"is not JSON: {e}"))
                continue
            if not isinstance(args, dict):
                problems.append((f"{where}.arguments", "must be a JSON object"))
            elif (why := _validate(args, params[call.function.name])) is not None:
                problems.append((f"{where}.arguments", f"do not match {call.function.name}'s parameters: {why}"))
    target = example.messages[-1]
    last = f"messages[{len(example.messages) - 1}]"
    if choice in ("required", "function") and not target.tool_calls:
        problems.append((f"{last}.tool_calls", f"tool_choice {choice!r} asks for a call, and the target makes none"))
    if name is not None and any(c.function.name != name for c in target.tool_calls or []):
        problems.append((f"{last}.tool_calls", f"tool_choice names {name!r}, and the target calls another function"))
    if choice == "none" and target.tool_calls:
        problems.append((f"{last}.tool_calls", "tool_choice 'none' forbids calls, and the target makes one"))
    if fmt is not None and not target.tool_calls:
        why = json_problem(target.content, fmt[0])
        if why is not None:
            problems.append((f"{last}.content", f"is not a valid answer for response_format: {why}"))
    return problems


def json_problem(text: str, schema: dict[str, Any]) -> str | None:
    """Why `text` is not JSON valid for `schema`, or None."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    return _validate(value, schema)


def spec(example: Example) -> GrammarSpec | None:
    """What decoding enforces for the example's prompt (None: free text) — what `serve` enforces."""
    if not example.structured:
        return None
    fmt, tools, choice, name = parsed(example)
    parallel = example.parallel_tool_calls if example.parallel_tool_calls is not None else True
    return grammar_spec(fmt, tools if choice != "none" else [], choice, name, parallel)


def prompt_tools(example: Example) -> list[dict[str, Any]] | None:
    """The tools the model is shown (none under `tool_choice: none`), normalised as `serve` does."""
    _, tools, choice, _ = parsed(example)
    return tools if tools and choice != "none" else None


def answer_problem(example: Example, text: str) -> str | None:
    """Why `text`, given as the answer to the example's prompt, does not fit the task; None if it does."""
    fmt, tools, choice, name = parsed(example)
    names = {t["function"]["name"] for t in tools} if choice != "none" else set()
    rest, calls = parse_tool_calls(text, names) if names else (text, [])
    if choice in ("required", "function") and not calls:
        return f"tool_choice {choice!r} asks for a call to one of {sorted(names)}, and the answer makes none"
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for c in calls:
        if name is not None and c["function"]["name"] != name:
            return f"calls {c['function']['name']!r} where tool_choice names {name!r}"
        why = _validate(json.loads(c["function"]["arguments"]), params[c["function"]["name"]])
        if why is not None:
            return f"{c['function']['name']} arguments do not match its parameters: {why}"
    if fmt is not None and not calls:
        return json_problem(rest or "", fmt[0])
    return None


# ------------------------------------------------------------------ rendering (training = serving)
def conversation(example: Example) -> list[dict[str, Any]]:
    """The example's turns as OpenAI chat messages, the target included."""
    return [m.openai() for m in example.messages]


def prompt_for(tokenizer: Any, example: Example) -> Any:
    """The prompt the model sees: its messages (plain chat) or, for a structured example, the text
    `serve` renders for the same request (`tools.render_conversation`, tools as the server shows them)."""
    if not example.structured:
        return example.prompt_messages
    from llamaduo.tools import render_conversation

    return render_conversation(tokenizer, conversation(example)[:-1], prompt_tools(example))


def completion_for(tokenizer: Any, example: Example) -> str:
    """What the model must write after `prompt_for`: the target turn as the template renders it
    (tool calls as the blocks `serve` parses back), with its end-of-turn."""
    from llamaduo.models import completion_text

    if not example.structured:
        return completion_text(tokenizer, example.messages)
    from llamaduo.tools import _template_messages, plain_messages, render_conversation, renders_tools

    shown = prompt_tools(example)
    conv = conversation(example)
    if renders_tools(tokenizer):
        prompt = render_conversation(tokenizer, conv[:-1], shown)
        full = tokenizer.apply_chat_template(_template_messages(conv), tools=shown, tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
        return example.response + (tokenizer.eos_token or "")
    return completion_text(tokenizer, plain_messages(conv, shown))


def history_spans(tokenizer: Any, example: Example, prompt_text: str) -> list[tuple[int, int]]:
    """Character spans, in the rendered prompt, of the assistant turns before the target (a tool
    conversation's earlier calls and answers): they are the model's own turns, so they are learnt
    too. A turn whose rendering is not where the template puts it is left out (no loss), never guessed."""
    spans = []
    for i, m in enumerate(example.messages[:-1]):
        if m.role != "assistant":
            continue
        upto = example.model_copy(update={"messages": example.messages[:i + 1]})  # turn i as the target
        before = prompt_for(tokenizer, upto)
        if not isinstance(before, str) or not prompt_text.startswith(before):
            continue
        own = completion_for(tokenizer, upto)
        if prompt_text.startswith(own, len(before)):
            spans.append((len(before), len(before) + len(own)))
    return spans
