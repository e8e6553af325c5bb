"""A round's synthetic data as the report shows it: counts of every row, a few rows sampled.

At the paper's volume a round holds hundreds of thousands of kept and rejected pairs; the page
shows how many there are (per rejection reason) and `SAMPLE_N` of each, drawn by reservoir
sampling with a seed per round, so the same files always give the same page. Both files are
streamed: only the counts and the sampled rows are held, whatever the files' size. Rejected rows
are read as `Rejection`s line by line (a damaged line names its file and line); kept pairs are
counted by line and only the sampled lines are parsed, as `Example`s.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from llamaduo.data import Example
from llamaduo.errors import UserError
from llamaduo.report.views import SAMPLE_N, SampleRow


class Rejection(BaseModel):
    """A row of rejected.jsonl as far as the report reads it (synth and dedup each add their own fields)."""

    model_config = ConfigDict(extra="allow")
    reason: str = "unknown"
    instruction: str = ""
    response: str = ""
    duplicate_of: str | None = None
    detail: str | None = None
    error: str | None = None
    seed_id: str | None = None


class _Reservoir:
    """`SAMPLE_N` items drawn uniformly from a stream of unknown length (Algorithm R)."""

    def __init__(self, rng: random.Random):
        self.rng, self.seen, self.items = rng, 0, []

    def offer(self, item: object) -> None:
        self.seen += 1
        if len(self.items) < SAMPLE_N:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < SAMPLE_N:
                self.items[j] = item


def _lines(path: Path, rerun: str):
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield n, line
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8; {rerun}") from None


def _problem(path: Path, n: int, e: ValidationError, rerun: str) -> UserError:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return UserError(f"{path}:{n}: " + (f"field '{loc}': " if loc else "") + f"{first.get('msg', 'invalid')}; {rerun}")


def rejected_sample(path: Path, r: int, rerun: str) -> tuple[Counter[str], dict[str, list[SampleRow]]]:
    """Rows of rejected.jsonl by reason, and up to `SAMPLE_N` of each reason."""
    rng = random.Random(f"report-rejected-{r}")
    pools: dict[str, _Reservoir] = {}
    for n, line in _lines(path, rerun):
        try:
            row = Rejection.model_validate_json(line)
        except ValidationError as e:
            raise _problem(path, n, e, rerun) from None
        pools.setdefault(row.reason, _Reservoir(rng)).offer(row)
    counts = Counter({reason: pool.seen for reason, pool in pools.items()})
    return counts, {reason: [_rejected_row(x) for x in pool.items] for reason, pool in sorted(pools.items())}


def _rejected_row(x: Rejection) -> SampleRow:
    why = [f"duplicate of {x.duplicate_of}" if x.duplicate_of else "", x.detail or "", x.error or "",
           f"seed {x.seed_id}" if x.seed_id else ""]
    return SampleRow(instruction=x.instruction, response=x.response, note="; ".join(w for w in why if w))


def kept_sample(path: Path, r: int, rerun: str) -> tuple[int, list[SampleRow]]:
    """Pairs in synthetic.jsonl, and up to `SAMPLE_N` of them."""
    pool = _Reservoir(random.Random(f"report-kept-{r}"))
    for n, line in _lines(path, rerun):
        pool.offer((n, line))
    rows = []
    for n, line in pool.items:  # type: ignore[misc]
        try:
            ex = Example.model_validate_json(line)
        except ValidationError as e:
            raise _problem(path, n, e, rerun) from None
        rows.append(SampleRow(instruction=ex.prompt, response=ex.response,
                              note=f"seed {ex.lineage.seed_id}" if ex.lineage.seed_id else ex.category))
    return pool.seen, rows
