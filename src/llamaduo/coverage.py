"""A coverage file into `Example`s: mapping each record (prompt/response fields or OpenAI chat
turns with tool calls and tool turns) and validating all of it, every problem with its file:line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaduo.config import DataConfig, FieldMap
from llamaduo.data import (
    Example,
    FunctionCall,
    Lineage,
    Message,
    ToolCall,
    content_id,
    lone_surrogate,
)
from llamaduo.files import jsonl_line
from llamaduo.ingest import DataError, Problem, RawRecord, detect_format, read_records

# ------------------------------------------------------------------ field mapping
STRUCTURE_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


def to_example(
    rec: RawRecord, fields: FieldMap, default_category: str, response_format: dict[str, Any] | None = None
) -> tuple[Example | None, list[Problem]]:
    """Map one record to an Example, or return every problem it has."""
    probs: list[Problem] = []

    def problem(field: str | None, msg: str) -> None:
        probs.append(Problem(source=rec.source, line=rec.line, unit=rec.unit, field=field, message=msg))

    if rec.error:
        problem(None, rec.error)
        return None, probs
    d = rec.data
    if not isinstance(d, dict):
        problem(None, f"expected an object, got {type(d).__name__}")
        return None, probs
    category = d.get(fields.category)
    if category is None or (isinstance(category, str) and not category.strip()):
        category = default_category
    elif not isinstance(category, str):
        problem(fields.category, f"must be a string, got {type(category).__name__}")
    elif (bad := lone_surrogate(category)) is not None:
        problem(fields.category, bad)
    system = d.get(fields.system)
    if system is not None and not isinstance(system, str):
        problem(fields.system, f"must be a string, got {type(system).__name__}")
        system = None
    if isinstance(system, str) and (bad := lone_surrogate(system)) is not None:
        problem(fields.system, bad)
        system = None
    system = system if system and system.strip() else None
    if fields.prompt in d or fields.response in d or fields.messages not in d:
        messages = _from_prompt_response(d, fields, system, problem)
    else:
        messages = _from_messages(d[fields.messages], fields.messages, problem)
        if messages and system and messages[0].role != "system":
            messages.insert(0, Message(role="system", content=system))
    structure = {k: d[k] for k in STRUCTURE_FIELDS if d.get(k) is not None}
    if response_format is not None:  # the task's format, unless the record brings its own
        structure.setdefault("response_format", response_format)
    # The request fields' JSON types, checked here so a wrong one is this record's error, never a traceback.
    for k, want, what in (("tools", (list,), "a list"), ("response_format", (dict,), "an object"),
                          ("tool_choice", (str, dict), "a string or an object"),
                          ("parallel_tool_calls", (bool,), "true or false")):
        if k in structure and not isinstance(structure[k], want):
            problem(k, f"must be {what}, got {type(structure[k]).__name__}")
    if probs or messages is None:
        return None, probs
    lineage = Lineage(source="coverage", origin=rec.where)
    # The user's own id when the record has one (their joins and reports use it); a content hash otherwise.
    rid = d.get(fields.id)
    ex_id = (str(rid) if rid is not None and rid != "" and not isinstance(rid, (dict, list))
             else content_id(messages, structure))
    return Example(id=ex_id, messages=messages, category=category, lineage=lineage, **structure), probs


def _text_field(d: dict, name: str, problem: Callable[[str | None, str], None], setting: str) -> str | None:
    if name not in d:
        have = ", ".join(sorted(map(str, d))[:20]) or "none"
        problem(name, f"missing (the record's fields: {have}; map yours with data.fields.{setting})")
        return None
    v = d[name]
    if v is None:
        problem(name, "is null")
        return None
    if not isinstance(v, str):
        problem(name, f"must be a string, got {type(v).__name__}")
        return None
    if not v.strip():
        problem(name, "empty")
        return None
    if (bad := lone_surrogate(v)) is not None:
        problem(name, bad)
        return None
    return v


def _from_prompt_response(d: dict, fields: FieldMap, system: str | None, problem) -> list[Message] | None:
    prompt = _text_field(d, fields.prompt, problem, "prompt")
    response = _text_field(d, fields.response, problem, "response")
    if prompt is None or response is None:
        return None
    msgs = [Message(role="system", content=system)] if system else []
    return msgs + [Message(role="user", content=prompt), Message(role="assistant", content=response)]


def _content_text(content: Any) -> str | None:
    """A turn's text: a string, or OpenAI content parts that are all text."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        )
    ):
        return "".join(p["text"] for p in content)
    return None


def _tool_calls(raw: Any, where: str, problem) -> list[ToolCall] | None:
    """An assistant turn's `tool_calls` in OpenAI's shape (arguments as JSON text)."""
    if not isinstance(raw, list) or not raw:
        problem(where, "must be a non-empty list of function calls")
        return None
    calls = []
    for j, c in enumerate(raw):
        w = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or c.get("type", "function") != "function":
            problem(w, 'must be {"type": "function", "function": {"name": ..., "arguments": ...}}')
            return None
        args = fn.get("arguments", "{}")
        if isinstance(args, dict):  # an object where OpenAI sends its JSON text: the same call
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            problem(f"{w}.function.arguments", f"must be a JSON object (or its text), got {type(args).__name__}")
            return None
        cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else f"call_{j}"
        calls.append(ToolCall(id=cid, function=FunctionCall(name=fn["name"], arguments=args)))
    return calls


def _from_messages(raw: Any, name: str, problem) -> list[Message] | None:
    """OpenAI-style turns: the last assistant turn is the target, everything before it context.
    Assistant turns may carry `tool_calls` (content then optional) and `tool` turns answer them."""
    if not isinstance(raw, list) or not raw:
        problem(name, "must be a non-empty list of {role, content}")
        return None
    msgs: list[Message] = []
    ok = True
    for i, m in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            problem(where, f"must be an object with role and content, got {type(m).__name__}")
            ok = False
            continue
        role = m.get("role")
        calls = None
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls", problem)
            ok = ok and calls is not None
        content = _content_text(m.get("content"))
        if content is None and calls and m.get("content") is None:
            content = ""
        if role not in ("system", "user", "assistant", "tool"):
            problem(f"{where}.role", f"must be system, user, assistant or tool, got {m.get('role')!r}")
            ok = False
        if content is None:
            got = "missing" if "content" not in m else "null" if m["content"] is None else type(m["content"]).__name__
            problem(f"{where}.content", f"must be a string, got {got}")
            ok = False
        elif (bad := lone_surrogate(content)) is not None:
            problem(f"{where}.content", bad)
            ok = False
        call_id = m.get("tool_call_id")
        if role == "tool" and not (isinstance(call_id, str) and call_id):
            problem(f"{where}.tool_call_id", "a tool turn needs the id of the call it answers")
            ok = False
        if ok:
            msgs.append(Message(role=role, content=content, tool_calls=calls,
                                tool_call_id=call_id if role == "tool" else None))
    if not ok:
        return None
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
    if last is None:
        problem(name, "has no assistant turn to learn from")
        return None
    if last != len(msgs) - 1:
        problem(
            f"{name}[{last + 1}]",
            f"{len(msgs) - 1 - last} turn(s) after the last assistant turn have no target",
        )
        return None
    if not msgs[-1].text.strip():
        problem(f"{name}[{last}].content", "empty")
        return None
    if not any(m.role == "user" and m.content.strip() for m in msgs[:-1]):
        problem(name, "has no non-empty user turn before the target")
        return None
    return msgs


# --------------------------------------------------------------------- validation
class Row:
    """A validated example held compactly: its JSONL line (what the run directory stores), id,
    category and lengths. A 200k-record file held as `Example` objects takes over 600 MB; as rows,
    about a quarter of that. `example()` gives the full object back."""

    __slots__ = ("id", "category", "line", "content", "prompt_chars", "response_chars")

    def __init__(self, ex: Example):
        self.id, self.category = ex.id, sys.intern(ex.category)
        self.line = jsonl_line(ex)
        self.content = content_id(ex.messages)  # decontamination against a given test file
        self.prompt_chars, self.response_chars = len(ex.prompt), len(ex.response)

    def example(self) -> Example:
        return Example.model_validate_json(self.line)


@dataclass
class Coverage:
    """A validated coverage file: unique examples (as compact rows) plus what was dropped and why."""

    rows: list[Row]
    records: int
    duplicates: int = 0  # exact same messages seen again: kept once
    filtered_out: int = 0  # outside `data.categories`
    warnings: list[str] = field(default_factory=list)

    @property
    def examples(self) -> list[Example]:
        return [r.example() for r in self.rows]


Check = Callable[[Example], list[tuple[str | None, str]]]


def load_coverage(path: Path, cfg: DataConfig, check: Check | None = None) -> Coverage:
    """Read and validate a whole coverage file. Raises DataError listing every problem.

    `check` adds the problems of an example's structure (`structure.check`: schemas, tool calls)
    as (field, message) pairs, reported at the record's line."""
    path = Path(path)
    fmt = detect_format(path, cfg.format)
    problems: list[Problem] = []
    examples: list[Row] = []
    seen_ids: dict[str, str] = {}
    seen_content: set[str] = set()
    duplicates = n = 0
    for rec in read_records(path, fmt):
        n += 1
        ex, probs = to_example(rec, cfg.fields, cfg.default_category, cfg.response_format)
        if ex is not None and check is not None and ex.structured and (found := check(ex)):
            probs += [Problem(source=rec.source, line=rec.line, unit=rec.unit, field=f, message=m) for f, m in found]
            ex = None
        problems += probs
        rid = rec.data.get(cfg.fields.id) if isinstance(rec.data, dict) else None
        if rid is not None and rid != "":
            rid = str(rid)
            if rid in seen_ids:
                msg = f"duplicate id {rid!r} (first at {seen_ids[rid]})"
                problems.append(
                    Problem(source=rec.source, line=rec.line, unit=rec.unit, field=cfg.fields.id, message=msg)
                )
            else:
                seen_ids[rid] = rec.where
        if ex is None:
            continue
        same = content_id(ex.messages, ex.request_fields())  # exact duplicates by content, whatever their ids
        if same in seen_content:
            duplicates += 1
            continue
        seen_content.add(same)
        examples.append(Row(ex))
    if problems:
        raise DataError(problems, path.name, n)
    if n == 0:
        raise DataError([Problem(source=path.name, message="no records")], path.name, 0)
    cov = Coverage(rows=examples, records=n, duplicates=duplicates)
    if duplicates:
        cov.warnings.append(f"{path.name}: {duplicates} exact duplicate record(s) kept once")
    if cfg.categories is not None:
        keep = set(cfg.categories)
        missing = sorted(keep - {e.category for e in examples})
        if missing:
            cov.warnings.append(
                f"{path.name}: no records in categor{'y' if len(missing) == 1 else 'ies'} {missing}"
            )
        cov.rows = [e for e in examples if e.category in keep]
        cov.filtered_out = len(examples) - len(cov.rows)
        if not cov.rows:
            msg = f"no records in categories {sorted(keep)}"
            raise DataError([Problem(source=path.name, field="category", message=msg)], path.name, n)
    return cov
