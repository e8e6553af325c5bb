"""Test-split decontamination, a chunk of new documents at a time (`dedup.clean` drives it).

`TestItems` holds what the checks need of the test split — its normalised prompts, its sorted
`decontam_ngram`-word keys, its MinHash signatures and their LSH buckets — and nothing of the
documents it checks: the training data passes through `drop_boilerplate` and the new pairs
through `contaminated`, one chunk of sketches (`similarity.Sketch`) at a time, so a million
documents never sit in memory as token arrays.

A new pair is contaminated when its instruction repeats a test prompt, when it shares a run of
`decontam_ngram` words with a test item (unless the training data holds that run too: then it
is the task's boilerplate, not a leak), or when its MinHash Jaccard estimate with a test item
reaches `decontam_jaccard` (test items found through LSH buckets).
"""

from __future__ import annotations

import numpy as np

from llamaduo.config import DedupConfig
from llamaduo.data import Example
from llamaduo.similarity import Sketch, TokenHashes, band_keys, lsh_params, ngram_keys, normalize, sketch

_MASK = np.uint64((1 << 22) - 1)  # slots of the membership filter in front of the sorted run keys


class _Runs:
    """Sorted distinct 64-bit keys with a one-slot-per-key-hash filter, so that the millions of
    runs of a chunk are looked up in a few thousand keys mostly without a binary search."""

    def __init__(self, keys: np.ndarray, owner: np.ndarray):
        self.keys, self.owner = keys, owner
        self.slots = np.zeros(int(_MASK) + 1, dtype=bool)
        self.slots[keys & _MASK] = True

    def find(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into `queries` that are keys, index of each in `keys`), in query order."""
        if not len(self.keys) or not len(queries):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        maybe = np.flatnonzero(self.slots[queries & _MASK])
        at = np.searchsorted(self.keys, queries[maybe]).clip(max=len(self.keys) - 1)
        hit = self.keys[at] == queries[maybe]
        return maybe[hit], at[hit]


class TestItems:
    """The test split as decontamination checks against it."""

    __test__ = False  # not a pytest class, whatever its name says

    def __init__(self, test: list[Example], dc: DedupConfig, vocab: TokenHashes):
        self.dc = dc
        self.ids = [t.id for t in test]
        pairs = [(normalize(t.prompt), normalize(t.response)) for t in test]
        self.prompts = {p: t.id for t, (p, _) in zip(test, pairs, strict=True) if p}
        sk = sketch(pairs, vocab, dc.shingle, dc.num_perm)
        self.sig = sk.sig
        # Word runs: each distinct key once, owned by the first test item holding it.
        keys, owner = ngram_keys(sk.th, sk.seg_len, dc.decontam_ngram, short=False)
        order = np.argsort(keys, kind="stable")
        run_keys, first = np.unique(keys[order], return_index=True)
        self.runs = _Runs(run_keys, owner[order][first])
        self.boiler = np.zeros(len(run_keys), dtype=bool)  # runs the training data also holds
        self._live: _Runs | None = None  # the runs that are not boilerplate, once the training data is read
        # LSH buckets per band: sorted keys with the test item of each, items in order within a bucket.
        self.bands, self.rows = lsh_params(dc.decontam_jaccard, dc.num_perm)
        live = np.flatnonzero(sk.has)
        keys_b = band_keys(self.sig[live], self.bands, self.rows)
        self.bucket_keys, self.bucket_items = [], []
        for k in range(self.bands):
            o = np.argsort(keys_b[:, k], kind="stable")
            self.bucket_keys.append(keys_b[o, k])
            self.bucket_items.append(live[o])

    def drop_boilerplate(self, sk: Sketch) -> None:
        """Mark the test's word runs that this chunk of training data also holds."""
        if not len(self.runs.keys) or not sk.th.size:
            return
        keys, _ = ngram_keys(sk.th, sk.seg_len, self.dc.decontam_ngram, short=False)
        self.boiler[self.runs.find(keys)[1]] = True
        self._live = None

    def contaminated(self, pairs: list[tuple[str, str]], sk: Sketch) -> dict[int, tuple[str, str]]:
        """Position in the chunk → (test id, why) for each document that leaks a test item."""
        found: dict[int, tuple[str, str]] = {}
        # (a) a test prompt repeated as an instruction
        for pos, (p, _) in enumerate(pairs):
            if p in self.prompts:
                found[pos] = (self.prompts[p], "instruction repeats a test prompt")
        # (b) a shared run of decontam_ngram words that is not boilerplate
        n = self.dc.decontam_ngram
        if self._live is None:
            self._live = _Runs(self.runs.keys[~self.boiler], self.runs.owner[~self.boiler])
        if len(self._live.keys):
            keys, owner = ngram_keys(sk.th, sk.seg_len, n, short=False)
            hit, at = self._live.find(keys)
            docs, first = np.unique(owner[hit], return_index=True)  # the first run of each document
            for pos, t in zip(docs.tolist(), self._live.owner[at[first]].tolist(), strict=True):
                found.setdefault(pos, (self.ids[t], f"shares a {n}-word run with a test item"))
        # (c) MinHash Jaccard estimate with a test item in a shared bucket: band by band, the
        # first test item (in order) that reaches the threshold
        bn = band_keys(sk.sig, self.bands, self.rows)
        open_ = sk.has.copy()
        open_[list(found)] = False
        for k in range(self.bands):
            cand = np.flatnonzero(open_)
            if not len(cand) or not len(self.bucket_keys[k]):
                break
            col = self.bucket_keys[k]
            lo = np.searchsorted(col, bn[cand, k], side="left")
            cnt = np.searchsorted(col, bn[cand, k], side="right") - lo
            cand, lo, cnt = cand[cnt > 0], lo[cnt > 0], cnt[cnt > 0]
            if not len(cand):
                continue
            pos = np.repeat(cand, cnt)
            start = np.repeat(lo - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt)
            item = self.bucket_items[k][start + np.arange(len(pos))]
            est = (sk.sig[pos] == self.sig[item]).mean(axis=1)
            ok = est >= self.dc.decontam_jaccard
            docs, first = np.unique(pos[ok], return_index=True)
            for d, t, e in zip(docs.tolist(), item[ok][first].tolist(), est[ok][first].tolist(), strict=True):
                found[d] = (self.ids[t], f"MinHash Jaccard {e:.2f} with a test item")
            open_[docs] = False
        return found
