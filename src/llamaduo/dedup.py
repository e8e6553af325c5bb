"""Synthetic-data hygiene: exact and near-duplicate removal, decontamination against the test split.

`clean(new, existing, test, cfg)` keeps the new examples worth training on and returns a
rejected row (with its reason and the id it duplicates) for every other one:

1. exact duplicates: same normalised instruction + response as an existing example or an
   earlier new one;
2. test contamination: a new pair that shares a run of `decontam_ngram` words with a test
   prompt or reference, repeats a test prompt, or whose MinHash Jaccard estimate with a test
   item reaches `decontam_jaccard`;
3. near duplicates: MinHash (word shingles) + LSH propose pairs, ROUGE-L F1 on the words
   confirms them; the first member of a cluster is kept, and existing data always wins.

Contamination is checked before near-duplication so that a dropped test look-alike never
stands as the representative that removes a clean pair.

Documents are read a chunk at a time (`CHUNK`): each chunk is normalised, tokenised and
sketched (`similarity.sketch`), checked against the test split (`decontam.TestItems`), and only
its LSH band keys (documents × bands, uint64) are kept for the near-duplicate pass; no token
array, normalised text or signature of the whole set is ever held. Exact duplicates are found by
a 16-byte digest of the normalised pair. Near duplicates are resolved in document order against
the representatives kept so far in each shared bucket, so a cluster of thousands costs one
check per member, not a check per pair.

The similarity measures (ROUGE-L, MinHash signatures, LSH buckets) are in `similarity.py`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llamaduo.config import Config, DedupConfig
from llamaduo.data import Example
from llamaduo.decontam import TestItems
from llamaduo.similarity import (
    TokenHashes,
    band_keys,
    lsh_params,
    normalize,
    rouge_l_f1,
    shared_buckets,
    sketch,
    words,
)

CHUNK = 8192  # documents sketched at a time
MAX_CHECKS = 32  # candidate representatives confirmed per document, most similar first


def _row(ex: Example, reason: str, duplicate_of: str | None, detail: str) -> dict[str, Any]:
    return {
        "id": ex.id,
        "instruction": ex.prompt,
        "response": ex.response,
        "category": ex.category,
        "reason": reason,
        "duplicate_of": duplicate_of,
        "detail": detail,
        "seed_id": ex.lineage.seed_id,
        "round": ex.lineage.round,
    }


def _chunks(examples: list[Example]) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """(offset, normalised (instruction, response) pairs) a chunk at a time."""
    for c0 in range(0, len(examples), CHUNK):
        yield c0, [(normalize(ex.prompt), normalize(ex.response)) for ex in examples[c0 : c0 + CHUNK]]


def _digest(pair: tuple[str, str]) -> bytes:
    """16 bytes standing for the normalised pair (the instruction's length keeps the split unambiguous)."""
    return hashlib.blake2b(f"{len(pair[0])}:{pair[0]}\x00{pair[1]}".encode(), digest_size=16).digest()


def clean(
    new: list[Example], existing: list[Example], test: list[Example], cfg: Config
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Filter `new` against itself, `existing` and `test`; returns (kept, rejected rows)."""
    dc: DedupConfig = cfg.dedup
    rejected: dict[int, dict[str, Any]] = {}
    if not new:
        return [], []
    vocab = TokenHashes()
    items = TestItems(test, dc, vocab) if test else None
    bands, rows = lsh_params(dc.jaccard, dc.num_perm)
    seen: dict[bytes, int] = {}  # digest → the first document with it: existing as -1 - i, new as i
    keys: list[np.ndarray] = []  # LSH band keys of the documents that take part, in order
    refs: list[np.ndarray] = []  # which document each row of `keys` is (same encoding as `seen`)

    # Existing data: its pairs are seen first (so it always wins), its runs are boilerplate.
    for c0, pairs in _chunks(existing):
        for i, pair in enumerate(pairs):
            seen.setdefault(_digest(pair), -1 - (c0 + i))
        sk = sketch(pairs, vocab, dc.shingle, dc.num_perm)
        if items is not None:
            items.drop_boilerplate(sk)
        live = np.flatnonzero(sk.has)  # a document without words has no meaningful signature
        keys.append(band_keys(sk.sig[live], bands, rows))
        refs.append(-1 - (c0 + live))

    for c0, pairs in _chunks(new):
        # 1. exact duplicates
        alive = []
        for i, pair in enumerate(pairs):
            d = _digest(pair)
            first = seen.setdefault(d, c0 + i)
            if first != c0 + i:
                dup = existing[-1 - first] if first < 0 else new[first]
                rejected[c0 + i] = _row(new[c0 + i], "exact_duplicate", dup.id, "same normalised instruction and response")
            else:
                alive.append(i)
        if not alive:
            continue
        pairs = [pairs[i] for i in alive]
        sk = sketch(pairs, vocab, dc.shingle, dc.num_perm)
        # 2. decontamination against the test split, before near duplicates, so that a dropped
        # test look-alike never stands as the representative that removes a clean pair
        keep = sk.has.copy()
        if items is not None:
            for pos, (test_id, detail) in items.contaminated(pairs, sk).items():
                i = c0 + alive[pos]
                rejected[i] = _row(new[i], "test_contamination", test_id, detail)
                keep[pos] = False
        live = np.flatnonzero(keep)
        keys.append(band_keys(sk.sig[live], bands, rows))
        refs.append(c0 + np.asarray(alive, dtype=np.int64)[live])

    # 3. near duplicates among what is left; existing data first, so it always wins
    ref = np.concatenate(refs) if refs else np.zeros(0, dtype=np.int64)

    def doc(row: int) -> Example:
        r = int(ref[row])
        return existing[-1 - r] if r < 0 else new[r]

    first_new = int(np.count_nonzero(ref < 0))
    all_keys = np.concatenate(keys) if keys else np.zeros((0, bands), dtype=np.uint64)
    for d, c, score in _near_duplicates(all_keys, first_new, doc, dc.rouge_l):
        i = int(ref[d])
        rejected[i] = _row(new[i], "near_duplicate", doc(c).id, f"ROUGE-L F1 {score:.2f}")

    kept = [ex for i, ex in enumerate(new) if i not in rejected]
    return kept, [rejected[i] for i in sorted(rejected)]


def _near_duplicates(
    keys: np.ndarray, first_new: int, doc: Callable[[int], Example], threshold: float
) -> list[tuple[int, int, float]]:
    """(row, the kept earlier row it duplicates, ROUGE-L F1) for each new near duplicate; rows
    before `first_new` are existing data and never removed.

    Rows are taken in order, so every earlier row's fate is known: a row is checked against the
    representatives (rows kept so far) of each bucket it shares, those sharing most bands first,
    up to MAX_CHECKS of them; a huge bucket offers its first and its latest representatives.
    A row that is kept becomes a representative of its shared buckets.
    """
    shared = shared_buckets(keys)
    reps: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    tokens: dict[int, list[str]] = {}

    def toks(r: int) -> list[str]:
        if r not in tokens:
            ex = doc(r)
            tokens[r] = words(ex.prompt + "\n" + ex.response)
        return tokens[r]

    found = []
    for d in np.flatnonzero(shared.any(axis=1)).tolist():
        mine = [(k, key) for k, (key, s) in enumerate(zip(keys[d].tolist(), shared[d].tolist(), strict=True)) if s]
        if d >= first_new:
            near: list[int] = []
            for k, key in mine:
                lst = reps[k].get(key)
                if lst:
                    near += lst if len(lst) <= 2 * MAX_CHECKS else lst[:MAX_CHECKS] + lst[-MAX_CHECKS:]
            count = Counter(near)  # bands shared with each representative
            hit = None
            for c in sorted(count, key=lambda c: (-count[c], c))[:MAX_CHECKS]:
                score = rouge_l_f1(toks(d), toks(c))
                if score > threshold:
                    hit = (d, c, score)
                    break
            if hit is not None:
                found.append(hit)
                tokens.pop(d, None)
                continue
        for k, key in mine:
            reps[k].setdefault(key, []).append(d)
    return found
