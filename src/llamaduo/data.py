"""The `Example` type (turns, tool calls, the structure its request carries) and run-directory examples.

Reading a coverage file into examples is `coverage.py`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_END = "}\n</tool_call>"  # closes the call object and its block
TOOL_CALL_SEPARATOR = "\n"


def tool_call_prefix(name: str) -> str:
    """A call block up to its arguments (the grammar's fixed text before the arguments JSON)."""
    return TOOL_CALL_OPEN + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def tool_call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it (the text format of `tools.py`); `arguments` a dict or JSON text."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return tool_call_prefix(name) + args + TOOL_CALL_END


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] | None = None  # an assistant turn's function calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @property
    def text(self) -> str:
        """The turn as the model reads or writes it: content, then each call as a `<tool_call>` block."""
        if not self.tool_calls:
            return self.content
        calls = [tool_call_text(c.function.name, c.function.arguments) for c in self.tool_calls]
        return TOOL_CALL_SEPARATOR.join([self.content, *calls] if self.content else calls)

    def chat(self) -> dict[str, str]:
        """The turn as plain chat: role and text (tool calls in their `<tool_call>` text form). The
        shape service requests are cached under, unchanged for plain turns."""
        return {"role": self.role, "content": self.text}

    def openai(self) -> dict[str, Any]:
        """The turn as an OpenAI chat message."""
        return self.model_dump(mode="json", exclude_none=True)


class Lineage(BaseModel):
    """Where an example came from: the coverage file, or a synthesis call."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["coverage", "synthetic", "capture", "shadow"] = "coverage"  # shadow: live traffic
    origin: str | None = None  # input file + line/row for coverage data; "shadow:<pair id>" for traffic
    round: int | None = None
    seed_id: str | None = None
    generator: str | None = None
    template_hash: str | None = None


class Example(BaseModel):
    """One training/test pair. `messages` ends with the assistant target turn (text, tool calls or both).

    A structured task's example also carries what its application sends with the request:
    the offered `tools` (with `tool_choice` / `parallel_tool_calls`) and a `response_format`.
    They are OpenAI's request fields as given; `structure.py` validates them and turns them into
    the grammar that inference and `serve` both enforce."""

    model_config = ConfigDict(extra="forbid")
    id: str
    messages: list[Message]
    category: str = "default"
    lineage: Lineage = Field(default_factory=Lineage)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the target: system, earlier turns, the last user turn."""
        return self.messages[:-1]

    @property
    def prompt(self) -> str:
        """The last user turn (the instruction)."""
        for m in reversed(self.messages[:-1]):
            if m.role == "user":
                return m.content
        return ""

    @property
    def response(self) -> str:
        """The target as the model writes it (tool calls as `<tool_call>` blocks)."""
        return self.messages[-1].text

    @property
    def structured(self) -> bool:
        """Whether the example needs more than plain chat turns: tools, tool turns or a response format."""
        return bool(self.tools or self.response_format or any(m.role == "tool" or m.tool_calls for m in self.messages))

    def request_fields(self) -> dict[str, Any]:
        """The structured-output fields an application sends with this prompt (OpenAI's names)."""
        fields = {"tools": self.tools, "tool_choice": self.tool_choice,
                  "parallel_tool_calls": self.parallel_tool_calls, "response_format": self.response_format}
        return {k: v for k, v in fields.items() if v is not None}


def content_id(messages: list[Message], extra: dict[str, Any] | None = None) -> str:
    """Stable id from content alone: the same pair gets the same id in every run."""
    rows: list[Any] = [
        [m.role, m.content] if not (m.tool_calls or m.tool_call_id) else [m.role, m.content, m.openai()]
        for m in messages
    ]
    if extra:  # tools / response format: the same text under another schema is another example
        rows.append(extra)
    blob = json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()
    return "ex-" + hashlib.sha256(blob).hexdigest()[:16]


def make_example(
    prompt: str,
    response: str,
    category: str = "default",
    system: str | None = None,
    lineage: Lineage | None = None,
) -> Example:
    msgs = ([Message(role="system", content=system)] if system else []) + [
        Message(role="user", content=prompt),
        Message(role="assistant", content=response),
    ]
    return Example(id=content_id(msgs), messages=msgs, category=category, lineage=lineage or Lineage())


def load_examples(path: Path) -> list[Example]:
    """Read a run-directory JSONL of examples (written by `files.write_jsonl`); a damaged line is a
    one-line error naming the file and line."""
    from llamaduo.files import read_rows

    return read_rows(path, Example, "the run's data is damaged: rerun `llamaduo prepare` (or `llamaduo run`)")


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """The problem with a string holding half of a UTF-16 pair (JSON allows `"\\ud800"`; UTF-8 cannot hold it)."""
    m = _SURROGATE.search(text)
    return None if m is None else f"holds a lone surrogate (\\u{ord(m.group(0)):04x}) at character {m.start() + 1}; not valid Unicode"
