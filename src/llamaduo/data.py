"""Coverage data: the `Example` type, reading user files, validation and the split."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.config import DataConfig, FieldMap

if TYPE_CHECKING:
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


# ------------------------------------------------------------------ reading files
class Problem(BaseModel):
    source: str
    line: int | None = None
    field: str | None = None
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        field = f" field '{self.field}':" if self.field else ""
        return f"{where}:{field} {self.message}"


class DataError(Exception):
    """Every problem found in an input, each naming its file, line (or row) and field."""

    def __init__(self, problems: list[Problem], source: str = "", records: int = 0):
        self.problems = problems
        self.source = source
        self.records = records
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in {records} records")


class RawRecord(BaseModel):
    source: str
    line: int  # 1-based line (JSONL), element index (JSON), data row (CSV/Parquet/HF)
    data: Any = None
    error: str | None = None


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise DataError([Problem(source=path.name, message=f"unknown format '{suffix}': use .jsonl, .json, .csv, .parquet")], path.name)
    return formats[suffix]


def read_records(path: Path, fmt: str = "auto") -> Iterator[RawRecord]:
    """Yield the input's records, each remembering where it came from; never raises on a bad record."""
    path = Path(path)
    src = path.name
    if not path.exists():
        raise DataError([Problem(source=str(path), message="no such file or directory")], str(path))
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRecord(source=src, line=i, error=f"undecodable bytes (not UTF-8) at byte {e.start}")
                    continue
                if not text.strip():
                    continue
                try:
                    yield RawRecord(source=src, line=i, data=json.loads(text))
                except json.JSONDecodeError as e:
                    yield RawRecord(source=src, line=i, error=f"bad JSON: {e.msg} (column {e.colno})")
    elif fmt == "json":
        try:
            items = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            yield RawRecord(source=src, line=0, error=f"undecodable bytes (not UTF-8) at byte {e.start}")
            return
        except json.JSONDecodeError as e:
            yield RawRecord(source=src, line=e.lineno, error=f"bad JSON: {e.msg} (column {e.colno})")
            return
        if isinstance(items, dict) and isinstance(items.get("data"), list):
            items = items["data"]
        if not isinstance(items, list):
            yield RawRecord(source=src, line=1, error="a .json input must be an array of records")
            return
        for i, item in enumerate(items):
            yield RawRecord(source=src, line=i, data=item)
    elif fmt == "csv":
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            yield RawRecord(source=src, line=line, error=f"undecodable bytes (not UTF-8) at byte {e.start}")
            return
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for i, row in enumerate(reader, start=1):
            yield RawRecord(source=src, line=i, data={k: v for k, v in row.items() if k is not None})
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield RawRecord(source=src, line=i, data=row)
    elif fmt == "hf":
        try:
            import datasets
        except ImportError:
            raise DataError([Problem(source=src, message="reading a saved HF dataset needs: pip install datasets")], src) from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, row in enumerate(ds, start=1):
            yield RawRecord(source=src, line=i, data=row)


def _unit(fmt: str) -> str:
    return {"jsonl": "line", "json": "element", "csv": "row"}.get(fmt, "row")


def to_example(rec: RawRecord, fields: FieldMap, default_category: str) -> tuple[Example | None, list[Problem]]:
    """Map one record to an Example, or return every problem it has."""
    probs: list[Problem] = []

    def problem(field: str | None, msg: str) -> None:
        probs.append(Problem(source=rec.source, line=rec.line, field=field, message=msg))

    if rec.error:
        problem(None, rec.error)
        return None, probs
    d = rec.data
    if not isinstance(d, dict):
        problem(None, f"expected an object, got {type(d).__name__}")
        return None, probs
    category = d.get(fields.category)
    if category is None or category == "":
        category = default_category
    elif not isinstance(category, str):
        problem(fields.category, f"must be a string, got {type(category).__name__}")
    system = d.get(fields.system)
    if system is not None and not isinstance(system, str):
        problem(fields.system, f"must be a string, got {type(system).__name__}")
        system = None
    if fields.prompt in d or fields.response in d or fields.messages not in d:
        messages = _from_prompt_response(d, fields, system or None, problem)
    else:
        messages = _from_messages(d.get(fields.messages), fields.messages, problem)
    if probs or messages is None:
        return None, probs
    lineage = Lineage(source="coverage", origin=f"{rec.source}:{rec.line}")
    return Example(id=content_id(messages), messages=messages, category=str(category), lineage=lineage), probs


def _text_field(d: dict, name: str, problem) -> str | None:
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


def _from_messages(raw: Any, name: str, problem) -> list[Message] | None:
    if not isinstance(raw, list) or not raw:
        problem(name, "must be a non-empty list of {role, content}")
        return None
    msgs: list[Message] = []
    for i, m in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            problem(where, "must be an object with role and content")
            return None
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            problem(f"{where}.role", f"must be system, user or assistant, got {role!r}")
            return None
        if not isinstance(content, str):
            problem(f"{where}.content", f"must be a string, got {type(content).__name__}")
            return None
        msgs.append(Message(role=role, content=content))
    last_assistant = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
    if last_assistant is None:
        problem(name, "has no assistant turn to learn from")
        return None
    if last_assistant != len(msgs) - 1:
        problem(name, "turns after the last assistant turn have no target")
        return None
    if not msgs[-1].content.strip():
        problem(f"{name}[{last_assistant}].content", "empty")
        return None
    if not any(m.role == "user" and m.content.strip() for m in msgs[:-1]):
        problem(name, "has no non-empty user turn before the target")
        return None
    return msgs


def load_coverage(path: Path, cfg: DataConfig) -> tuple[list[Example], list[str]]:
    """Read and validate a whole coverage file. Raises DataError listing every problem."""
    path = Path(path)
    fmt = detect_format(path, cfg.format)
    problems: list[Problem] = []
    warnings: list[str] = []
    examples: list[Example] = []
    seen_ids: dict[str, int] = {}
    seen_content: set[str] = set()
    duplicates = 0
    n = 0
    for rec in read_records(path, fmt):
        n += 1
        ex, probs = to_example(rec, cfg.fields, cfg.default_category)
        for p in probs:
            p.unit = _unit(fmt)
        problems += probs
        if isinstance(rec.data, dict) and cfg.fields.id in rec.data and rec.data[cfg.fields.id] not in (None, ""):
            rid = str(rec.data[cfg.fields.id])
            if rid in seen_ids:
                problems.append(
                    Problem(source=rec.source, line=rec.line, field=cfg.fields.id, message=f"duplicate id {rid!r} (first at {seen_ids[rid]})")
                )
            else:
                seen_ids[rid] = rec.line
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
    if duplicates:
        warnings.append(f"{path.name}: {duplicates} exact duplicate record(s) kept once")
    if cfg.categories is not None:
        keep = set(cfg.categories)
        examples = [e for e in examples if e.category in keep]
        if not examples:
            raise DataError([Problem(source=path.name, message=f"no records in categories {sorted(keep)}")], path.name, n)
    return examples, warnings


# ------------------------------------------------------------------------- split
def split(
    examples: list[Example], test_fraction: float, seed: int, max_test: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Stratified by category; deterministic per seed; each category with ≥ 2 examples is in both."""
    rng = random.Random(seed)
    by_cat: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_cat[e.category].append(e)
    total = len(examples)
    want_total = round(total * test_fraction) if max_test is None else min(max_test, round(total * test_fraction))
    test_ids: set[str] = set()
    for cat in sorted(by_cat):
        items = sorted(by_cat[cat], key=lambda e: e.id)
        rng.shuffle(items)
        if len(items) < 2:
            continue
        k = max(1, round(len(items) * want_total / total)) if total else 0
        k = min(k, len(items) - 1)
        test_ids.update(e.id for e in items[:k])
    train = [e for e in examples if e.id not in test_ids]
    test = [e for e in examples if e.id in test_ids]
    return train, test


# ------------------------------------------------------------------------- stats
def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"p10": 0, "p50": 0, "p90": 0, "max": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return float(v[min(len(v) - 1, int(round(p * (len(v) - 1))))])

    return {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": float(v[-1])}


def compute_stats(train: list[Example], test: list[Example], tokenizer: Any = None) -> dict[str, Any]:
    cats = sorted({e.category for e in train} | {e.category for e in test})
    per_cat = {
        c: {"train": sum(e.category == c for e in train), "test": sum(e.category == c for e in test)} for c in cats
    }
    for c in per_cat.values():
        c["total"] = c["train"] + c["test"]
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

        def ntok(text: str) -> int:
            enc = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)["input_ids"]
            return len(enc)

        stats["tokens"] = {
            "prompt": _quantiles([ntok(e.prompt) for e in everything]),
            "response": _quantiles([ntok(e.response) for e in everything]),
        }
    return stats


def render_stats_table(stats: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    t = Table(title="coverage data")
    for col in ("category", "train", "test", "total"):
        t.add_column(col, justify="right" if col != "category" else "left")
    for cat, c in stats["categories"].items():
        t.add_row(cat, str(c["train"]), str(c["test"]), str(c["total"]))
    counts = stats["counts"]
    t.add_row("[bold]all[/]", str(counts["train"]), str(counts["test"]), str(counts["total"]))
    lengths = Table(title="lengths")
    for col in ("", "p10", "p50", "p90", "max"):
        lengths.add_column(col, justify="right" if col else "left")
    for unit in ("chars", "tokens"):
        for part in ("prompt", "response"):
            if unit in stats:
                q = stats[unit][part]
                lengths.add_row(f"{part} {unit}", *(f"{q[k]:.0f}" for k in ("p10", "p50", "p90", "max")))
    return Group(t, lengths)


# ----------------------------------------------------------------------- prepare
class PrepareResult(BaseModel):
    run_dir: Path
    train_count: int
    test_count: int
    stats: dict[str, Any]
    warnings: list[str] = []


def prepare(cfg: Config, store: RunStore) -> PrepareResult:
    """Validate, split and write the coverage data. Nothing is written when the input has errors."""
    from llamaduo.config import dump_config
    from llamaduo.store import atomic_write_text, hash_obj, write_json, write_jsonl

    if cfg.data.input is None:
        raise DataError([Problem(source="config", field="data.input", message="not set")], "config")
    examples, warnings = load_coverage(Path(cfg.data.input), cfg.data)
    if cfg.data.test_file is not None:
        test, test_warn = load_coverage(Path(cfg.data.test_file), cfg.data)
        warnings += test_warn
        test_ids = {e.id for e in test}
        train = [e for e in examples if e.id not in test_ids]
        if len(train) < len(examples):
            warnings.append(f"{len(examples) - len(train)} training example(s) also in the test file were removed from train")
        if cfg.data.max_test is not None and len(test) > cfg.data.max_test:
            _, test = split(test, cfg.data.max_test / len(test), cfg.seed)
    else:
        train, test = split(examples, cfg.data.test_fraction, cfg.seed, cfg.data.max_test)
    if not train or not test:
        raise DataError(
            [Problem(source=Path(cfg.data.input).name, message=f"too few examples to split: train {len(train)}, test {len(test)}")],
            Path(cfg.data.input).name,
            len(examples),
        )
    tokenizer = None
    if cfg.data.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    stats = compute_stats(train, test, tokenizer)
    # Only now, with everything valid, does anything touch the disk.
    write_jsonl(store.train_path, train)
    write_jsonl(store.test_path, test)
    write_json(store.stats_path, stats)
    atomic_write_text(store.config_path, dump_config(cfg))
    store.init_manifest(cfg.seed)
    store.mark_stage(
        "prepare", "done", inputs_hash=hash_obj({"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}),
        train=len(train), test=len(test),
    )
    return PrepareResult(run_dir=store.root, train_count=len(train), test_count=len(test), stats=stats, warnings=warnings)
