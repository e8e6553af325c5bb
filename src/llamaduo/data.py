"""Coverage data: the `Example` type, reading user files, validation and the split."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Lineage(BaseModel):
    """Where an example came from: the coverage file, or a synthesis call."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["coverage", "synthetic", "capture"] = "coverage"
    origin: str | None = None  # input file + line/row for coverage data
    round: int | None = None
    seed_id: str | None = None
    generator: str | None = None
    template_hash: str | None = None


class Example(BaseModel):
    """One training/test pair. `messages` ends with the assistant target turn."""

    model_config = ConfigDict(extra="forbid")
    id: str
    messages: list[Message]
    category: str = "default"
    lineage: Lineage = Field(default_factory=Lineage)

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
        return self.messages[-1].content


def content_id(messages: list[Message]) -> str:
    """Stable id from content alone: the same pair gets the same id in every run."""
    blob = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False).encode()
    return "ex-" + hashlib.sha256(blob).hexdigest()[:16]


def make_example(
    prompt: str, response: str, category: str = "default", system: str | None = None, lineage: Lineage | None = None
) -> Example:
    msgs = ([Message(role="system", content=system)] if system else []) + [
        Message(role="user", content=prompt),
        Message(role="assistant", content=response),
    ]
    return Example(id=content_id(msgs), messages=msgs, category=category, lineage=lineage or Lineage())


def load_examples(path) -> list[Example]:
    """Read a run-directory JSONL of examples (written by `store.write_jsonl`)."""
    from llamaduo.store import read_jsonl

    return [Example.model_validate(row) for row in read_jsonl(path)]
