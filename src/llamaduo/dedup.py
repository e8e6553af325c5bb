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

The similarity measures (ROUGE-L, MinHash signatures, LSH buckets) are in `similarity.py`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from llamaduo.config import Config, DedupConfig
from llamaduo.data import Example
from llamaduo.similarity import (
    MAX_CHECKS,
    TokenHashes,
    band_keys,
    candidates,
    flatten,
    lsh_params,
    ngram_keys,
    normalize,
    rouge_l_f1,
    signatures,
    words,
)


# ----------------------------------------------------------------------- clean
@dataclass
class _Docs:
    """Documents as the similarity checks see them: two segments each (instruction, response)."""

    examples: list[Example]
    pairs: list[tuple[str, str]]  # normalised (instruction, response)
    th: np.ndarray  # token hashes of all segments, concatenated
    seg_len: np.ndarray  # documents × 2
    sig: np.ndarray  # MinHash signatures, documents × num_perm
    has: np.ndarray  # documents with at least one shingle

    @classmethod
    def of(cls, examples: list[Example], pairs: list[tuple[str, str]], vocab: TokenHashes, dc: DedupConfig) -> _Docs:
        th, seg_len = flatten(pairs, vocab, normalized=True)
        keys, owner = ngram_keys(th, seg_len, dc.shingle, short=True)
        sig, has = signatures(keys, owner, len(examples), dc.num_perm)
        return cls(examples, pairs, th, seg_len, sig, has)


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


def _normalized(examples: list[Example]) -> list[tuple[str, str]]:
    return [(normalize(ex.prompt), normalize(ex.response)) for ex in examples]


def clean(
    new: list[Example], existing: list[Example], test: list[Example], cfg: Config
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Filter `new` against itself, `existing` and `test`; returns (kept, rejected rows)."""
    dc: DedupConfig = cfg.dedup
    rejected: dict[int, dict[str, Any]] = {}

    # 1. exact duplicates
    pairs_new, pairs_old = _normalized(new), _normalized(existing)
    seen: dict[tuple[str, str], str] = {}
    for ex, key in zip(existing, pairs_old, strict=True):
        seen.setdefault(key, ex.id)
    for i, (ex, key) in enumerate(zip(new, pairs_new, strict=True)):
        if key in seen:
            rejected[i] = _row(ex, "exact_duplicate", seen[key], "same normalised instruction and response")
        else:
            seen[key] = ex.id
    alive = [i for i in range(len(new)) if i not in rejected]
    if not alive:
        return [], [rejected[i] for i in sorted(rejected)]

    vocab = TokenHashes()
    docs = _Docs.of([new[i] for i in alive], [pairs_new[i] for i in alive], vocab, dc)
    old = _Docs.of(existing, pairs_old, vocab, dc)

    # 2. decontamination against the test split
    if test:
        for pos, (test_id, detail) in _contaminated(docs, old, test, dc, vocab).items():
            rejected[alive[pos]] = _row(docs.examples[pos], "test_contamination", test_id, detail)

    # 3. near duplicates among what is left; existing data first, so it always wins
    rows = [p for p, i in enumerate(alive) if i not in rejected]
    if rows:
        both = old.examples + [docs.examples[p] for p in rows]
        sig = np.concatenate([old.sig, docs.sig[rows]])
        has = np.concatenate([old.has, docs.has[rows]])
        for d, c, score in _near_duplicates(both, sig, has, len(existing), dc):
            i = alive[rows[d - len(existing)]]
            rejected[i] = _row(new[i], "near_duplicate", both[c].id, f"ROUGE-L F1 {score:.2f}")

    kept = [ex for i, ex in enumerate(new) if i not in rejected]
    return kept, [rejected[i] for i in sorted(rejected)]


def _drop_found(keys: np.ndarray, owners: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`keys` (and their owners) without those that occur in `others`."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    # Look the few distinct keys up in the (possibly huge) other array, not the other way round.
    at = np.searchsorted(uniq, others).clip(max=len(uniq) - 1)
    found = np.zeros(len(uniq), dtype=bool)
    found[at[uniq[at] == others]] = True
    keep = ~found[inverse.ravel()]
    return keys[keep], owners[keep]


def _contaminated(docs: _Docs, old: _Docs, test: list[Example], dc: DedupConfig, vocab: TokenHashes) -> dict[int, tuple[str, str]]:
    """Position in `docs` → (test id, why) for each document that leaks a test item."""
    found: dict[int, tuple[str, str]] = {}
    tdocs = _Docs.of(test, _normalized(test), vocab, dc)

    # (a) a test prompt repeated as an instruction
    prompts = {p: t.id for t, (p, _) in zip(test, tdocs.pairs, strict=True) if p}
    for pos, (p, _) in enumerate(docs.pairs):
        if p in prompts:
            found[pos] = (prompts[p], "instruction repeats a test prompt")

    # (b) a shared run of decontam_ngram words. Runs that the existing training data also
    # holds are the task's boilerplate (a fixed instruction, a shared passage), not a leak of
    # one test item, so they do not count.
    n = dc.decontam_ngram
    tkeys, towner = ngram_keys(tdocs.th, tdocs.seg_len, n, short=False)
    if len(tkeys) and old.th.size:
        tkeys, towner = _drop_found(tkeys, towner, ngram_keys(old.th, old.seg_len, n, short=False)[0])
    if len(tkeys):
        order = np.argsort(tkeys)
        tkeys, towner = tkeys[order], towner[order]
        nkeys, nowner = ngram_keys(docs.th, docs.seg_len, n, short=False)
        at = np.searchsorted(tkeys, nkeys).clip(max=len(tkeys) - 1)
        hit = tkeys[at] == nkeys
        for pos, t in zip(nowner[hit].tolist(), towner[at[hit]].tolist(), strict=True):
            found.setdefault(pos, (test[t].id, f"shares a {n}-word run with a test item"))

    # (c) MinHash Jaccard estimate with a test item, test items bucketed by LSH
    bands, rows = lsh_params(dc.decontam_jaccard, dc.num_perm)
    bt, bn = band_keys(tdocs.sig, bands, rows), band_keys(docs.sig, bands, rows)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for t in np.flatnonzero(tdocs.has).tolist():
        for k in range(bands):
            buckets[(k, int(bt[t, k]))].append(t)
    for k in range(bands):
        for pos in np.flatnonzero(np.isin(bn[:, k], bt[tdocs.has, k]) & docs.has).tolist():
            if pos in found:
                continue
            for t in buckets.get((k, int(bn[pos, k])), []):
                est = float(np.mean(docs.sig[pos] == tdocs.sig[t]))
                if est >= dc.decontam_jaccard:
                    found[pos] = (test[t].id, f"MinHash Jaccard {est:.2f} with a test item")
                    break
    return found


def _near_duplicates(
    docs: list[Example], sig: np.ndarray, has: np.ndarray, first_new: int, dc: DedupConfig
) -> list[tuple[int, int, float]]:
    """(document, the kept earlier document it duplicates, ROUGE-L F1) for each new near
    duplicate; documents before `first_new` are existing data and never removed."""
    bands, rows = lsh_params(dc.jaccard, dc.num_perm)
    index = np.flatnonzero(has)  # a document without words has no meaningful signature
    cands = candidates(band_keys(sig[index], bands, rows), index, first_new)
    kept = np.ones(len(docs), dtype=bool)
    tokens: dict[int, list[str]] = {}

    def toks(d: int) -> list[str]:
        if d not in tokens:
            tokens[d] = words(docs[d].prompt + "\n" + docs[d].response)
        return tokens[d]

    found = []
    for d in sorted(cands):  # in order, so every earlier document's fate is already known
        shared = cands[d]
        for c in sorted((c for c in shared if kept[c]), key=lambda c: (-shared[c], c))[:MAX_CHECKS]:
            score = rouge_l_f1(toks(d), toks(c))
            if score > dc.rouge_l:
                kept[d] = False
                found.append((d, c, score))
                break
    return found
