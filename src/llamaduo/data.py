"""Coverage data: the `Example` type, mapping and validating records (read by `ingest`), the split."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.config import DataConfig, FieldMap
from llamaduo.ingest import DataError, Problem, RawRecord, detect_format, read_records

if TYPE_CHECKING:
    from rich.table import Table

    from llamaduo.config import Config
    from llamaduo.store import RunStore


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
    """Read a run-directory JSONL of examples (written by `store.write_jsonl`); a damaged line is a
    one-line error naming the file and line."""
    from llamaduo.store import read_rows

    return read_rows(path, Example, "the run's data is damaged: rerun `llamaduo prepare` (or `llamaduo run`)")


# ------------------------------------------------------------------ field mapping
def to_example(
    rec: RawRecord, fields: FieldMap, default_category: str
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
    system = d.get(fields.system)
    if system is not None and not isinstance(system, str):
        problem(fields.system, f"must be a string, got {type(system).__name__}")
        system = None
    system = system if system and system.strip() else None
    if fields.prompt in d or fields.response in d or fields.messages not in d:
        messages = _from_prompt_response(d, fields, system, problem)
    else:
        messages = _from_messages(d[fields.messages], fields.messages, problem)
        if messages and system and messages[0].role != "system":
            messages.insert(0, Message(role="system", content=system))
    if probs or messages is None:
        return None, probs
    lineage = Lineage(source="coverage", origin=rec.where)
    return Example(id=content_id(messages), messages=messages, category=category, lineage=lineage), probs


def _text_field(d: dict, name: str, problem: Callable[[str | None, str], None]) -> str | None:
    if name not in d or d[name] is None:
        problem(name, "missing")
        return None
    v = d[name]
    if not isinstance(v, str):
        problem(name, f"must be a string, got {type(v).__name__}")
        return None
    if not v.strip():
        problem(name, "empty")
        return None
    return v


def _from_prompt_response(d: dict, fields: FieldMap, system: str | None, problem) -> list[Message] | None:
    prompt = _text_field(d, fields.prompt, problem)
    response = _text_field(d, fields.response, problem)
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


def _from_messages(raw: Any, name: str, problem) -> list[Message] | None:
    """OpenAI-style turns: the last assistant turn is the target, everything before it context."""
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
        role, content = m.get("role"), _content_text(m.get("content"))
        if role not in ("system", "user", "assistant"):
            problem(f"{where}.role", f"must be system, user or assistant, got {m.get('role')!r}")
            ok = False
        if content is None:
            got = "missing" if m.get("content") is None else type(m.get("content")).__name__
            problem(f"{where}.content", f"must be a string, got {got}")
            ok = False
        if ok:
            msgs.append(Message(role=role, content=content))
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
    if not msgs[-1].content.strip():
        problem(f"{name}[{last}].content", "empty")
        return None
    if not any(m.role == "user" and m.content.strip() for m in msgs[:-1]):
        problem(name, "has no non-empty user turn before the target")
        return None
    return msgs


# --------------------------------------------------------------------- validation
@dataclass
class Coverage:
    """A validated coverage file: unique examples plus what was dropped and why."""

    examples: list[Example]
    records: int
    duplicates: int = 0  # exact same messages seen again: kept once
    filtered_out: int = 0  # outside `data.categories`
    warnings: list[str] = field(default_factory=list)


def load_coverage(path: Path, cfg: DataConfig) -> Coverage:
    """Read and validate a whole coverage file. Raises DataError listing every problem."""
    path = Path(path)
    fmt = detect_format(path, cfg.format)
    problems: list[Problem] = []
    examples: list[Example] = []
    seen_ids: dict[str, str] = {}
    seen_content: set[str] = set()
    duplicates = n = 0
    for rec in read_records(path, fmt):
        n += 1
        ex, probs = to_example(rec, cfg.fields, cfg.default_category)
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
        if ex.id in seen_content:
            duplicates += 1
            continue
        seen_content.add(ex.id)
        examples.append(ex)
    if problems:
        raise DataError(problems, path.name, n)
    if n == 0:
        raise DataError([Problem(source=path.name, message="no records")], path.name, 0)
    cov = Coverage(examples=examples, records=n, duplicates=duplicates)
    if duplicates:
        cov.warnings.append(f"{path.name}: {duplicates} exact duplicate record(s) kept once")
    if cfg.categories is not None:
        keep = set(cfg.categories)
        missing = sorted(keep - {e.category for e in examples})
        if missing:
            cov.warnings.append(
                f"{path.name}: no records in categor{'y' if len(missing) == 1 else 'ies'} {missing}"
            )
        cov.examples = [e for e in examples if e.category in keep]
        cov.filtered_out = len(examples) - len(cov.examples)
        if not cov.examples:
            msg = f"no records in categories {sorted(keep)}"
            raise DataError([Problem(source=path.name, field="category", message=msg)], path.name, n)
    return cov


# ------------------------------------------------------------------------- split
def split(
    examples: list[Example], test_fraction: float, seed: int, max_test: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Stratified split; deterministic per seed; no example in both; input order kept.

    Each category with ≥ 2 examples gets at least one test example and keeps at least one
    for training; sizes are proportional (largest remainder). `max_test` is a hard cap: when
    it is below the number of categories, the largest categories get the test slots.
    """
    by_cat: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_cat[e.category].append(e)
    total = len(examples)
    target = round(total * test_fraction)
    if max_test is not None:
        target = min(target, max_test)
    eligible = {c: items for c, items in by_cat.items() if len(items) >= 2}
    quota = {c: len(items) * target / max(total, 1) for c, items in eligible.items()}
    k = {c: min(max(1, int(q)), len(eligible[c]) - 1) for c, q in quota.items()}
    # Hand the rounding leftovers to the categories that lost the most to rounding down.
    for c in sorted(eligible, key=lambda c: (k[c] - quota[c], c)):
        if sum(k.values()) >= target:
            break
        if k[c] < len(eligible[c]) - 1:
            k[c] += 1
    # The one-each minimum may overshoot a hard cap: trim where most above share, then the smallest.
    while max_test is not None and sum(k.values()) > max_test:
        over = [c for c in k if k[c] > 1]
        if over:
            k[max(over, key=lambda c: (k[c] - quota[c], c))] -= 1
        else:
            k[min((c for c in k if k[c]), key=lambda c: (len(eligible[c]), c))] = 0
    test_ids: set[str] = set()
    for c, n in k.items():
        # A per-category stream keeps a category's split unchanged when other categories change.
        items = sorted(eligible[c], key=lambda e: e.id)
        random.Random(f"{seed}:{c}").shuffle(items)
        test_ids.update(e.id for e in items[:n])
    train = [e for e in examples if e.id not in test_ids]
    test = [e for e in examples if e.id in test_ids]
    return train, test


# ------------------------------------------------------------------------- stats
def _quantiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank quantiles: every reported value is one that occurs in the data."""
    if not values:
        return {"p10": 0, "p50": 0, "p90": 0, "max": 0}
    v = sorted(values)
    n = len(v)

    def q(p: float) -> int:
        return v[max(0, math.ceil(p * n) - 1)]

    return {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": v[-1]}


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text))

    def count(text: str) -> int:
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, Mapping) else getattr(out, "input_ids", out)
        return len(ids)

    return count


def compute_stats(train: list[Example], test: list[Example], tokenizer: Any = None) -> dict[str, Any]:
    """Counts per category per split, and length quantiles (chars; tokens when a tokenizer is given)."""
    cats = sorted({e.category for e in train} | {e.category for e in test})
    per_cat: dict[str, dict[str, int]] = {c: {"train": 0, "test": 0, "total": 0} for c in cats}
    for name, part in (("train", train), ("test", test)):
        for e in part:
            per_cat[e.category][name] += 1
            per_cat[e.category]["total"] += 1
    everything = train + test
    stats: dict[str, Any] = {
        "counts": {"train": len(train), "test": len(test), "total": len(everything)},
        "categories": per_cat,
        "chars": {
            "prompt": _quantiles([len(e.prompt) for e in everything]),
            "response": _quantiles([len(e.response) for e in everything]),
        },
    }
    if tokenizer is not None:
        ntok = _token_counter(tokenizer)
        stats["tokens"] = {
            "prompt": _quantiles([ntok(e.prompt) for e in everything]),
            "response": _quantiles([ntok(e.response) for e in everything]),
        }
    return stats


def render_stats_table(stats: dict[str, Any]) -> Table:
    """Per-category train/test/total counts; the length summary goes in the caption."""
    from rich.table import Table

    t = Table(title="coverage data")
    t.add_column("category")
    for col in ("train", "test", "total"):
        t.add_column(col, justify="right")
    for cat, c in stats["categories"].items():
        t.add_row(cat, str(c["train"]), str(c["test"]), str(c["total"]))
    counts = stats["counts"]
    t.add_section()
    t.add_row("all", str(counts["train"]), str(counts["test"]), str(counts["total"]), style="bold")
    lines = []
    for unit in ("chars", "tokens"):
        for part in ("prompt", "response"):
            if unit in stats:
                q = stats[unit][part]
                lines.append(f"{part} {unit}: p10 {q['p10']}  p50 {q['p50']}  p90 {q['p90']}  max {q['max']}")
    dropped = stats.get("input", {})
    if dropped.get("duplicates"):
        lines.append(f"duplicates kept once: {dropped['duplicates']}")
    t.caption = "\n".join(lines)
    t.caption_justify = "left"
    t.min_width = max(map(len, lines), default=0) + 2  # so the summary lines do not wrap
    return t


# ----------------------------------------------------------------------- prepare
class PrepareResult(BaseModel):
    run_dir: Path
    train_count: int
    test_count: int
    stats: dict[str, Any]
    warnings: list[str] = []


def _load_tokenizer(name: str) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # ImportError, OSError for a bad path, ValueError for an odd config
        raise DataError(
            [Problem(source="config", field="data.tokenizer", message=f"cannot load: {e}")], "config"
        ) from None


def prepare(cfg: Config, store: RunStore) -> PrepareResult:
    """Validate, split and write the coverage data. Nothing is written when the input has errors."""
    import shutil

    from llamaduo.config import dump_config
    from llamaduo.store import atomic_write_text, write_json, write_jsonl

    if cfg.data.input is None:
        raise DataError([Problem(source="config", field="data.input", message="not set")], "config")
    src = Path(cfg.data.input)
    cov = load_coverage(src, cfg.data)
    warnings = list(cov.warnings)
    removed = 0
    if cfg.data.test_file is not None:
        test_cov = load_coverage(Path(cfg.data.test_file), cfg.data)
        warnings += test_cov.warnings
        test = test_cov.examples
        # Decontaminate: a pair in the given test file must not also be trained on.
        test_ids = {e.id for e in test}
        train = [e for e in cov.examples if e.id not in test_ids]
        removed = len(cov.examples) - len(train)
        if removed:
            warnings.append(f"{removed} training example(s) also in the test file were removed from train")
        if cfg.data.max_test is not None and len(test) > cfg.data.max_test:
            _, test = split(test, cfg.data.max_test / len(test), cfg.seed, cfg.data.max_test)
    else:
        train, test = split(cov.examples, cfg.data.test_fraction, cfg.seed, cfg.data.max_test)
    if not train or not test:
        msg = f"too few examples to split: train {len(train)}, test {len(test)}"
        raise DataError([Problem(source=src.name, message=msg)], src.name, cov.records)
    untested = sorted({e.category for e in train} - {e.category for e in test})
    if untested:
        warnings.append(f"no test examples for categor{'y' if len(untested) == 1 else 'ies'} {untested}")
    tokenizer = _load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    stats = compute_stats(train, test, tokenizer)
    stats["input"] = {
        "records": cov.records,
        "duplicates": cov.duplicates,
        "filtered_out": cov.filtered_out,
        "removed_as_in_test_file": removed,
    }
    # Only now, with everything valid, does anything touch the disk.
    existed = store.root.exists()
    try:
        write_jsonl(store.train_path, train)
        write_jsonl(store.test_path, test)
        write_json(store.stats_path, stats)
        atomic_write_text(store.config_path, dump_config(cfg))
        store.init_manifest(cfg.seed)  # the stage engine records the prepare stage itself
    except BaseException:
        if not existed:  # a half-made run dir would later look like a prepared run
            shutil.rmtree(store.root, ignore_errors=True)
        raise
    return PrepareResult(
        run_dir=store.root, train_count=len(train), test_count=len(test), stats=stats, warnings=warnings
    )
