"""Function calling: tools into the prompt, the model's tool calls out of its text.

A conversation here is OpenAI-shaped dicts: `role` (system, user, assistant, tool), `content`,
an assistant's `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments"}}`,
arguments a JSON string) and a tool message's `tool_call_id`.

`render_conversation` renders it through the model's chat template with `tools=` when the
template uses them (Qwen 2.5, Hermes, Llama 3.1 ...). Templates that ignore tools (ChatML,
Gemma's) get the text format below instead, which training and serving share, so a model
fine-tuned on calls sees at serving time exactly what it learnt from:

- the tools go into the system turn (after any system text of the conversation's own):

      # Tools

      You may call one or more functions to assist with the user query.

      You are provided with function signatures within <tools></tools> XML tags:
      <tools>
      {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
      </tools>

      For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
      <tool_call>
      {"name": <function-name>, "arguments": <args-json-object>}
      </tool_call>

- an assistant turn with calls is its text followed by one block per call,
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, separated by newlines;
- the answers of tools (consecutive `tool` messages) form one user turn of
  `<tool_response>\\n...\\n</tool_response>` blocks.

This is the format of Qwen 2.5's and Hermes' templates, so models trained on either read it.
The grammar for a forced call (`grammar.py`) produces exactly these blocks; `parse_tool_calls`
reads them back (and a bare `{"name": ..., "arguments"|"parameters": ...}` answer, as Llama 3.1
templates ask for).
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

from llamaduo.data import (  # noqa: F401  (the call format lives with the Message type; re-exported here)
    TOOL_CALL_END,
    TOOL_CALL_OPEN,
    TOOL_CALL_SEPARATOR,
    Message,
    tool_call_prefix,
    tool_call_text,
)

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# A block's call up to its arguments, as the grammar (and Hermes/Qwen templates) write it.
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_PROBE = "llamaduo_probe_tool"
_renders_tools: dict[tuple[int, str], bool] = {}

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The tools block of the system turn (the text format)."""
    lines = [json.dumps(t, ensure_ascii=False) for t in tools]
    return "\n".join([TOOLS_HEADER, *lines, TOOLS_FOOTER])


# ------------------------------------------------------------------ prompts
def plain_messages(conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[Message]:
    """The conversation in the text format: system, user and assistant turns only."""
    out: list[Message] = []
    responses: list[str] = []

    def flush() -> None:
        if responses:
            out.append(Message(role="user", content="\n".join(responses)))
            responses.clear()

    for m in conversation:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            responses.append(f"<tool_response>\n{content}\n</tool_response>")
            continue
        flush()
        if role == "assistant" and m.get("tool_calls"):
            calls = [tool_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            content = TOOL_CALL_SEPARATOR.join([content, *calls] if content else calls)
        out.append(Message(role=role, content=content))
    flush()
    if tools:
        block = tools_text(tools)
        if out and out[0].role == "system":
            out[0] = Message(role="system", content=f"{out[0].content}\n\n{block}")
        else:
            out.insert(0, Message(role="system", content=block))
    return out


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template puts `tools=` into the prompt (cached per template)."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    key = (id(tokenizer), template)
    if key not in _renders_tools:
        probe = [{"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {"type": "object"}}}]
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe, tokenize=False,
                                                 add_generation_prompt=True)
            _renders_tools[key] = _PROBE in text
        except Exception:  # a template that cannot take tools does not render them
            _renders_tools[key] = False
    return _renders_tools[key]


def _template_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face templates expect them: call arguments as objects, not JSON text."""
    out = []
    for m in conversation:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                args = c["function"]["arguments"]
                with contextlib.suppress(ValueError):
                    args = json.loads(args) if isinstance(args, str) else args
                calls.append({**c, "function": {**c["function"], "arguments": args}})
            m["tool_calls"] = calls
        m["content"] = m.get("content") or ""
        out.append(m)
    return out


def render_conversation(tokenizer: Any, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text (with the assistant generation prefix) for a conversation that may carry tools."""
    if renders_tools(tokenizer):
        return tokenizer.apply_chat_template(_template_messages(conversation), tools=tools or None, tokenize=False,
                                             add_generation_prompt=True)
    from llamaduo.models import render_prompt

    return render_prompt(tokenizer, plain_messages(conversation, tools))


# ------------------------------------------------------------------ answers
def raw_arguments(block: str) -> str | None:
    """The arguments object exactly as written in a `{"name": ..., "arguments": {...}}` block, or None.

    Kept verbatim (as OpenAI returns what the model wrote), so a streamed call, whose arguments go
    out as they are decoded, and the same call answered whole carry the same text."""
    head = CALL_HEAD.match(block)
    if head is None:
        return None
    try:
        args, end = json.JSONDecoder().raw_decode(block, head.end())
    except ValueError:
        return None
    return block[head.end():end] if isinstance(args, dict) and block[end:].strip() == "}" else None


def _call(obj: Any, names: set[str], raw: str | None = None) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": raw if raw is not None else json.dumps(args, ensure_ascii=False)},
    }


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left over or None, calls) from a model's answer; only calls to `names` count.

    A block that does not parse as a call to an offered function stays in the content."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match) -> str:
        try:
            call = _call(json.loads(match.group(1)), names, raw_arguments(match.group(1)))
        except ValueError:
            call = None
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = _BLOCK.sub(take, text).strip()
    if not calls and rest.startswith("{"):
        try:
            call = _call(json.loads(rest), names, raw_arguments(rest))
        except ValueError:
            call = None
        if call is not None:
            return None, [call]
    return (rest or None), calls
