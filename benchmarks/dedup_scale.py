"""Dedup at scale: build N records from No Robots with planted duplicates, run `dedup.clean`.

    python benchmarks/dedup_scale.py --records 256000

Records are made by sampling sentences of No Robots prompts (the instruction) and responses
(the response), so nearly all are distinct. Planted on top, each placed after its original:
near duplicates (one word changed or deleted), exact duplicates, and look-alikes of held-out
test items (which decontamination must drop). The last line is

    seconds=<wall of clean()> peak_mb=<peak RSS> recall=<near-dups found ÷ planted> precision=<true ÷ flagged>
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sys
import time
from pathlib import Path

from llamaduo.config import Config
from llamaduo.data import Example, make_example
from llamaduo.dedup import clean

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "no_robots" / "no_robots.jsonl"
SENT = re.compile(r"(?<=[.!?])\s+|\n+")
WORD = re.compile(r"\w+")


def sentences(text: str) -> list[str]:
    # Bounded length: one giant "sentence" (a regex, a table) shared by two records would
    # make them genuine near duplicates that nobody planted.
    return [s.strip() for s in SENT.split(text) if 4 <= len(WORD.findall(s)) <= 60]


def edit(text: str, rng: random.Random, vocab: list[str]) -> str:
    """One small edit: a word replaced by another, or deleted."""
    w = text.split(" ")
    i = rng.randrange(len(w))
    if rng.random() < 0.5:
        w[i] = rng.choice(vocab)
    else:
        del w[i]
    return " ".join(w)


def build(n: int, seed: int, near_share: float, exact_share: float, n_test: int):
    rows = [json.loads(line) for line in DATA.open(encoding="utf-8")]
    rng = random.Random(seed)
    rng.shuffle(rows)
    test_rows, pool_rows = rows[:n_test], rows[n_test:]
    test = [make_example(r["prompt"], r["response"], r["category"]) for r in test_rows]
    p_sents = sorted({s for r in pool_rows for s in sentences(r["prompt"])})
    r_sents = sorted({s for r in pool_rows for s in sentences(r["response"])})
    cats = sorted({r["category"] for r in pool_rows})
    vocab = sorted({w for s in r_sents[:5000] for w in s.split()})

    n_near, n_exact = int(n * near_share), int(n * exact_share)
    n_contam = min(n_test, max(1, n // 1000))
    n_base = n - n_near - n_exact - n_contam
    base = []
    for _ in range(n_base):
        instr = " ".join(rng.sample(p_sents, rng.randint(1, 3)))
        resp = " ".join(rng.sample(r_sents, rng.randint(3, 6)))
        base.append((instr, resp, rng.choice(cats)))

    # Planted copies: (record, original index in base); each goes somewhere after its original.
    planted: list[tuple[tuple[str, str, str], int, str]] = []
    for _ in range(n_near):
        j = rng.randrange(n_base)
        instr, resp, cat = base[j]
        if rng.random() < 0.7:
            resp = edit(resp, rng, vocab)
        else:
            instr = edit(instr, rng, vocab)
        planted.append(((instr, resp, cat), j, "near"))
    for _ in range(n_exact):
        j = rng.randrange(n_base)
        planted.append((base[j], j, "exact"))

    slots: dict[int, list[tuple[tuple[str, str, str], str]]] = {}
    for rec, j, kind in planted:
        slots.setdefault(rng.randint(j, n_base - 1), []).append((rec, kind))
    records: list[tuple[tuple[str, str, str], str]] = []
    for i, rec in enumerate(base):
        records.append((rec, "base"))
        records.extend(slots.get(i, []))
    for t in rng.sample(test, n_contam):  # test look-alikes: one word changed in the reference
        records.insert(rng.randrange(len(records)), ((t.prompt, edit(t.response, rng, vocab), t.category), "contam"))

    examples: list[Example] = []
    kinds: dict[str, str] = {}
    for (instr, resp, cat), kind in records:
        ex = make_example(instr, resp, cat)
        examples.append(ex)
        if kind != "base":
            kinds.setdefault(ex.id, kind)
    return examples, test, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=256_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--near", type=float, default=0.02, help="share of planted near duplicates")
    ap.add_argument("--exact", type=float, default=0.01, help="share of planted exact duplicates")
    ap.add_argument("--test", type=int, default=300, help="held-out No Robots items used as the test split")
    ap.add_argument("--set", action="append", default=[], help="dedup.KEY=VALUE overrides, e.g. shingle=3")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA.name}: not found next to the repository (expected ../shared/data/no_robots/)")

    t0 = time.perf_counter()
    examples, test, kinds = build(args.records, args.seed, args.near, args.exact, args.test)
    built = time.perf_counter() - t0
    cfg = Config()
    for item in args.set:
        k, v = item.split("=", 1)
        setattr(cfg.dedup, k, type(getattr(cfg.dedup, k))(v))

    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    kept, rejected = clean(examples, [], test, cfg)
    seconds = time.perf_counter() - t0

    by_reason: dict[str, set[str]] = {}
    for row in rejected:
        by_reason.setdefault(row["reason"], set()).add(row["id"])
    planted = {k: {i for i, kind in kinds.items() if kind == k} for k in ("near", "exact", "contam")}
    flagged = by_reason.get("near_duplicate", set())
    found = planted["near"] & (flagged | by_reason.get("test_contamination", set()))
    recall = len(planted["near"] & flagged) / max(1, len(planted["near"]))
    precision = len(planted["near"] & flagged) / max(1, len(flagged))
    exact_found = len(planted["exact"] & by_reason.get("exact_duplicate", set())) / max(1, len(planted["exact"]))
    contam_found = len(planted["contam"] & by_reason.get("test_contamination", set())) / max(1, len(planted["contam"]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"records={len(examples)} build_s={built:.1f} peak_before_clean_mb={before_mb:.0f} kept={len(kept)} "
        + " ".join(f"{k}={len(v)}" for k, v in sorted(by_reason.items()))
        + f" planted_near={len(planted['near'])} planted_exact={len(planted['exact'])} planted_contam={len(planted['contam'])}"
        + f" exact_recall={exact_found:.4f} contam_recall={contam_found:.4f} near_removed_any_reason={len(found)}"
    )
    print(f"seconds={seconds:.1f} peak_mb={peak_mb:.0f} recall={recall:.4f} precision={precision:.4f}")


if __name__ == "__main__":
    main()
