"""Exact metrics of a structured task, beside the judge: does the answer parse, fit its schema, call
the right tool with the right arguments?

An LLM judge can score an answer well that the application cannot even parse. For an example
whose request carries a `response_format` or `tools` (`data.Example`), each candidate is measured
against the example's reference answer:

- `json_valid`: the structured part parses — the content as JSON (response-format task), every
  tool call as a JSON object with a function name and an arguments object (tool task);
- `schema_valid`: the answer fits the request's contract — `structure.answer_problem` finds
  nothing (response schema, the called tools' parameters, `tool_choice`), and every `<tool_call>`
  block is a call to an offered tool;
- `tool_name_match`: the called function names equal the reference's, in order;
- `arguments_exact`: that, and each call's arguments JSON-equal to the reference call's;
- `field_accuracy`: the share of the reference's top-level fields (the JSON object it answers, or
  its calls' arguments) whose values are JSON-equal in the candidate.

A metric that does not apply is None — tool metrics on a schema task, everything on a free-text
example — shown as n/a, never 0. `failure` says what broke first ("wrong tool: track instead of
refund", "argument city: 'Lyon' instead of 'Leeds'") for the report's worst items.

`exact_stats` aggregates a judged set's candidates (every candidate counts: measuring costs no
service call) into rates with a prompt-level bootstrap CI (`scoring.metric_stats`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llamaduo import structure
from llamaduo.artifacts import EXACT_METRICS, Completion, MetricStats
from llamaduo.chat_formats import FieldError
from llamaduo.data import Example
from llamaduo.scoring import metric_stats

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)  # the block `tools.parse_tool_calls` reads
_SHOWN = 60  # characters of a value shown in a failure


@dataclass
class Exact:
    """One candidate's exact metrics (1.0 / 0.0, a share for field_accuracy; None: does not apply)."""

    json_valid: float | None = None
    schema_valid: float | None = None
    tool_name_match: float | None = None
    arguments_exact: float | None = None
    field_accuracy: float | None = None
    failure: str | None = None  # the first structural failure, None when nothing measured failed

    def values(self) -> dict[str, float | None]:
        return {m: getattr(self, m) for m in EXACT_METRICS}


def json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: `true` is not `1`, `1` is `1.0`, objects ignore key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _show(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def _loads(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except ValueError as e:
        return None, str(e)


_Call = tuple[str | None, dict[str, Any] | None, str | None]  # (name, arguments, why it is not a usable call)


def answer_calls(text: str) -> list[_Call]:
    """Every call the answer writes: one per `<tool_call>` block, or a bare `{"name", "arguments"}` answer."""
    blocks = _BLOCK.findall(text)
    if not blocks:
        obj, _ = _loads(text.strip()) if text.strip().startswith("{") else (None, None)
        if not (isinstance(obj, dict) and "name" in obj and ("arguments" in obj or "parameters" in obj)):
            return []
        blocks = [text.strip()]
    out: list[_Call] = []
    for block in blocks:
        obj, err = _loads(block)
        if err is not None:
            out.append((None, None, f"a tool call is not JSON ({err})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            out.append((None, None, "a tool call names no function"))
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            args, _ = _loads(args)
        if not isinstance(args, dict):
            out.append((obj["name"], None, f"the {obj['name']} call's arguments are not a JSON object"))
            continue
        out.append((obj["name"], args, None))
    return out


def _fields(ref: dict[str, Any], got: Any, what: str) -> tuple[int, str | None]:
    """(fields of `ref` equal in `got`, the first one that is not)."""
    got = got if isinstance(got, dict) else {}
    hits, first = 0, None
    for k, v in ref.items():
        if k in got and json_equal(got[k], v):
            hits += 1
        elif first is None:
            first = f"{what} {k}: " + (f"{_show(got[k])} instead of {_show(v)}" if k in got else f"missing ({_show(v)} expected)")
    return hits, first


def _names(names: list[str | None]) -> str:
    return ", ".join(n or "?" for n in names) or "no call"


def candidate_metrics(example: Example, text: str) -> Exact:
    """The exact metrics of one answer `text` to the example's prompt, against the example's reference."""
    try:
        fmt, tools, choice, _ = structure.parsed(example)
    except FieldError as e:  # prepare refuses such examples; a hand-edited split must not stop the report
        return Exact(failure=f"the test example's structure is invalid ({e.param}: {e.reason})")
    tool_task = bool(tools) and choice != "none"
    if fmt is None and not tool_task:
        return Exact()  # free text: the judge alone measures it
    out = Exact()
    failures: list[str | None] = []
    target = example.messages[-1]
    ref_calls = [(c.function.name, _loads(c.function.arguments)[0]) for c in target.tool_calls or []]
    calls = answer_calls(text) if tool_task else []
    content, content_err = _loads(text) if fmt is not None and not calls else (None, None)

    if calls:
        bad = [why for _, _, why in calls if why is not None]
        out.json_valid = float(not bad)
        failures.append(bad[0] if bad else None)
    elif fmt is not None:
        out.json_valid = float(content_err is None)
        failures.append(f"not JSON ({content_err})" if content_err else None)
    elif ref_calls:
        out.json_valid = 0.0  # the reference's structured part is its calls, and the answer writes none

    offered = {t["function"]["name"] for t in tools}
    problem = structure.answer_problem(example, text)
    if problem is None:  # a block that is no usable call to an offered tool is not what the application can run
        problem = next((why or f"calls {name!r}, which is not an offered tool" for name, args, why in calls
                        if why is not None or name not in offered), None)
    out.schema_valid = float(problem is None)
    failures.append(problem)

    if tool_task:
        names, ref_names = [n for n, _, _ in calls], [n for n, _ in ref_calls]
        out.tool_name_match = float(names == ref_names)
        if names != ref_names:
            failures.append(f"wrong tool: {_names(names)} instead of {_names(ref_names)}" if names and ref_names
                            else f"{_names(names)} instead of {_names(ref_names)}")
        total = hits = 0
        for i, (ref_name, ref_args) in enumerate(ref_calls):
            ref_args = ref_args if isinstance(ref_args, dict) else {}
            total += len(ref_args)
            name, args, _ = calls[i] if i < len(calls) else (None, None, None)
            if name == ref_name and args is not None:
                n, first = _fields(ref_args, args, "argument")
                hits += n
                extra = next((k for k in args if k not in ref_args), None)
                failures.append(first or (f"argument {extra}: {_show(args[extra])} is not in the reference call"
                                          if extra is not None else None))
        exact = names == ref_names and all(
            args is not None and json_equal(args, ref_args) for (_, args, _), (_, ref_args) in zip(calls, ref_calls, strict=True))
        out.arguments_exact = float(exact)
        out.field_accuracy = hits / total if total else None
    if fmt is not None and not ref_calls:
        ref, _ = _loads(target.content)
        if isinstance(ref, dict) and ref:
            hits, first = _fields(ref, content, "field")
            out.field_accuracy = hits / len(ref)
            failures.append(first)
    out.failure = next((f for f in failures if f), None)
    return out


def _rate(stats: MetricStats) -> MetricStats:
    # coverage@50/@70 are judge-score statistics (a score ≥ 50); a rate in [0, 1] has none
    return stats.model_copy(update={"coverage_50": None, "coverage_70": None})


def exact_stats(predictions: Iterable[Completion], test: list[Example]) -> dict[str, MetricStats]:
    """metric → its rate over a judged set's candidates with a prompt-level bootstrap CI; only the metrics that
    apply to at least one candidate (empty for a free-text task). Failed rows (`ok` false) were never answers."""
    examples = {ex.id: ex for ex in test}
    values: dict[str, tuple[list[float], list[str]]] = {m: ([], []) for m in EXACT_METRICS}
    for p in predictions:
        ex = examples.get(p.prompt_id)
        if ex is None or not p.ok or not ex.structured:
            continue
        for m, v in candidate_metrics(ex, p.text).values().items():
            if v is not None:
                values[m][0].append(v)
                values[m][1].append(p.prompt_id)
    return {m: _rate(metric_stats(v, g)) for m, (v, g) in values.items() if v}
