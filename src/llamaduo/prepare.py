"""`llamaduo prepare`: validate the coverage data, split it, describe it, write the run's data.

The split is stratified by category and deterministic per seed; the stats (counts per
category and split, length quantiles) are what `prepare` prints and stores beside the split.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from llamaduo import structure
from llamaduo.coverage import Row, load_coverage
from llamaduo.data import Example
from llamaduo.ingest import DataError, Problem

if TYPE_CHECKING:
    from rich.table import Table

    from llamaduo.config import Config
    from llamaduo.store import RunStore


# ------------------------------------------------------------------------- split
E = TypeVar("E", Example, Row)  # split works on anything with an id and a category


def split(
    examples: list[E], test_fraction: float, seed: int, max_test: int | None = None
) -> tuple[list[E], list[E]]:
    """Stratified split; deterministic per seed; no example in both; input order kept.

    Each category with ≥ 2 examples gets at least one test example and keeps at least one
    for training; sizes are proportional (largest remainder). `max_test` is a hard cap: when
    it is below the number of categories, the largest categories get the test slots.
    """
    by_cat: dict[str, list[E]] = defaultdict(list)
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


def split_warning(n_train: int, n_test: int, asked: float, max_test: int | None) -> list[str]:
    """Say when the split could not honour `test_fraction` (every category keeps one test example,
    and one for training), and by how much."""
    total = n_train + n_test
    if not total or (max_test is not None and n_test >= max_test):
        return []
    got = n_test / total
    if abs(got - asked) <= max(0.02, 0.1 * asked) and abs(n_test - round(total * asked)) <= 1:
        return []
    why = ("small categories each give one test example" if got > asked
           else "small categories keep their only examples for training")
    return [f"test split is {got:.1%} of the data ({n_test} of {total}), not the {asked:.1%} asked"
            f" (data.test_fraction), {got - asked:+.1%}: {why}"]


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


def _chars(e: Example | Row) -> tuple[int, int]:
    return (e.prompt_chars, e.response_chars) if isinstance(e, Row) else (len(e.prompt), len(e.response))


def compute_stats(train: list[Any], test: list[Any], tokenizer: Any = None) -> dict[str, Any]:
    """Counts per category per split, and length quantiles (chars; tokens when a tokenizer is given),
    over examples or coverage rows."""
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
            "prompt": _quantiles([_chars(e)[0] for e in everything]),
            "response": _quantiles([_chars(e)[1] for e in everything]),
        },
    }
    if tokenizer is not None:
        ntok = _token_counter(tokenizer)
        counts = [(ntok(x.prompt), ntok(x.response))
                  for x in (e.example() if isinstance(e, Row) else e for e in everything)]
        stats["tokens"] = {
            "prompt": _quantiles([c[0] for c in counts]),
            "response": _quantiles([c[1] for c in counts]),
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
    from llamaduo.files import atomic_write_text, write_json, write_jsonl

    if cfg.data.input is None:
        raise DataError([Problem(source="config", field="data.input", message="not set")], "config")
    src = Path(cfg.data.input)
    cov = load_coverage(src, cfg.data, check=structure.check)
    warnings = list(cov.warnings)
    removed = 0
    if cfg.data.test_file is not None:
        test_cov = load_coverage(Path(cfg.data.test_file), cfg.data, check=structure.check)
        warnings += test_cov.warnings
        test = test_cov.rows
        # Decontaminate: a pair in the given test file must not also be trained on.
        test_ids = {e.id for e in test} | {e.content for e in test}
        train = [e for e in cov.rows if e.id not in test_ids and e.content not in test_ids]
        removed = len(cov.rows) - len(train)
        if removed:
            warnings.append(f"{removed} training example(s) also in the test file were removed from train")
        if cfg.data.max_test is not None and len(test) > cfg.data.max_test:
            _, test = split(test, cfg.data.max_test / len(test), cfg.seed, cfg.data.max_test)
    else:
        train, test = split(cov.rows, cfg.data.test_fraction, cfg.seed, cfg.data.max_test)
        warnings += split_warning(len(train), len(test), cfg.data.test_fraction, cfg.data.max_test)
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
        write_jsonl(store.train_path, (e.line for e in train))
        write_jsonl(store.test_path, (e.line for e in test))
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
