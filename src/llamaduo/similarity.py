"""Text similarity for dedup and decontamination: normalised words, ROUGE-L, MinHash, LSH.

MinHash signatures are computed for all documents at once with numpy: the permutations are
datasketch's `affine32` scheme (murmur3 finaliser, then `a * h + b` mod 2^32), so one
signature equals what `datasketch.MinHash(scheme="affine32")` gives for the same shingle
hashes, at a fraction of the cost of per-document updates.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np

_WORD = re.compile(r"\w+")
_U32 = np.uint32
_U64 = np.uint64
# The LSH only proposes pairs (ROUGE-L or the Jaccard estimate decides), so a missed pair
# costs far more than an extra check: weight false negatives heavily when choosing bands.
_LSH_WEIGHTS = (0.05, 0.95)
_CHUNK = 1 << 14  # shingles per signature block (× num_perm × 4 bytes of scratch: 8 MB, within the L3 cache)
_ROLL = _U64(0x100000001B3)  # multiplier of the polynomial n-gram hash


# ------------------------------------------------------------------------- text
def normalize(text: str) -> str:
    """Case-folded, NFKC-normalised text with runs of whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words(text: str) -> list[str]:
    """The word tokens every similarity here is computed on."""
    return _WORD.findall(normalize(text))


def rouge_l_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences: 2·LCS / (|a| + |b|).

    The LCS length comes from the bit-parallel algorithm (Hyyrö 2004), one big-int step per
    token of `b`, so long texts cost microseconds instead of a quadratic table.
    """
    if not a or not b:
        return 1.0 if not a and not b else 0.0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    lcs = len(a) - v.bit_count()
    return 2.0 * lcs / (len(a) + len(b))


# --------------------------------------------------------------------- hashing
class TokenHashes(dict):
    """Stable 64-bit hash per distinct token (blake2b of its UTF-8 bytes), computed once per
    vocabulary entry. Keys are the tokens' UTF-8 bytes (what `tokens` gives); a str key hashes
    the same as its bytes."""

    def __missing__(self, tok: bytes | str) -> int:
        data = tok.encode() if isinstance(tok, str) else tok
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        self[tok] = h
        return h


# ASCII bytes that are not word characters become spaces; NUL (the segment separator) and the
# bytes of multi-byte UTF-8 characters stay.
_ASCII_WORDS = bytes(c if c == 0 or c >= 128 or chr(c).isalnum() or c == ord("_") else 32 for c in range(256))


def tokens(texts: Sequence[str]) -> list[list[bytes]]:
    """`_WORD.findall` of each text, as UTF-8 bytes, for many texts at once.

    ASCII text (most of it) is tokenised by one byte translation and `split` instead of the
    regex, which costs several times more per character; other text goes through the regex
    and is joined by spaces, so both come out of the same split.
    """
    if not texts:
        return []
    joined = b"\x00".join(
        t.encode() if t.isascii() and "\x00" not in t else " ".join(_WORD.findall(t)).encode() for t in texts
    )
    return [part.split() for part in joined.translate(_ASCII_WORDS).split(b"\x00")]


def flatten(
    docs: Sequence[Sequence[str]], vocab: TokenHashes, normalized: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Token hashes of every segment of every document, concatenated, and segment lengths
    (shape docs × segments). Shingles never span two segments."""
    nseg = len(docs[0]) if docs else 0
    texts = [text if normalized else normalize(text) for segments in docs for text in segments]
    toks = tokens(texts)
    lengths = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    flat = np.fromiter(map(vocab.__getitem__, chain.from_iterable(toks)), dtype=_U64, count=int(lengths.sum()))
    return flat, lengths.reshape(len(docs), nseg)


def ngram_keys(th: np.ndarray, seg_len: np.ndarray, n: int, short: bool) -> tuple[np.ndarray, np.ndarray]:
    """64-bit keys of every word n-gram inside a segment, with the document of each.

    `short=True` gives a segment with fewer than n words (but at least one) one shingle of all
    its words, so short texts still get a signature.
    """
    ndocs, nseg = seg_len.shape
    lens = seg_len.ravel()
    seg_doc = np.repeat(np.arange(ndocs), nseg)
    if n == 1:
        return th, np.repeat(seg_doc, lens)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    counts = np.maximum(lens - n + 1, 0)
    pos = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
    keys = np.zeros(len(pos), dtype=_U64)
    for j in range(n):
        keys = keys * _ROLL + th[pos + j]
    docs = np.repeat(seg_doc, counts)
    if short:
        extra_k, extra_d = [], []
        for s in np.flatnonzero((lens > 0) & (lens < n)):
            k = 0  # the same polynomial in Python ints, reduced mod 2^64 like the numpy version
            for h in th[starts[s] : starts[s] + lens[s]].tolist():
                k = (k * int(_ROLL) + h) & 0xFFFFFFFFFFFFFFFF
            extra_k.append(k)
            extra_d.append(seg_doc[s])
        if extra_k:
            keys = np.concatenate([keys, np.array(extra_k, dtype=_U64)])
            docs = np.concatenate([docs, np.array(extra_d, dtype=np.int64)])
            order = np.argsort(docs, kind="stable")
            keys, docs = keys[order], docs[order]
    return keys, docs


@dataclass
class Sketch:
    """A chunk of documents as the similarity checks see them: token hashes of every segment,
    segment lengths (documents × segments), MinHash signatures and which documents have words."""

    th: np.ndarray
    seg_len: np.ndarray
    sig: np.ndarray
    has: np.ndarray


def sketch(docs: Sequence[Sequence[str]], vocab: TokenHashes, shingle: int, num_perm: int) -> Sketch:
    """`flatten` (of normalised text), shingles of `shingle` words, and their signatures."""
    th, seg_len = flatten(docs, vocab, normalized=True)
    keys, owner = ngram_keys(th, seg_len, shingle, short=True)
    sig, has = signatures(keys, owner, len(docs), num_perm)
    return Sketch(th, seg_len, sig, has)


def shingle_hash(key: np.ndarray) -> np.ndarray:
    """32-bit hash of a 64-bit shingle key (what datasketch calls `hashfunc`)."""
    return ((key >> _U64(32)) ^ key).astype(_U32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch's pre-mix for the affine32 scheme)."""
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> _U32(13))
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch's affine32 permutations for this seed: odd a, any b."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=_U32) * _U32(2) + _U32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=_U32)
    return a, b


def signatures(keys: np.ndarray, docs: np.ndarray, ndocs: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signature (ndocs × num_perm, uint32) of each document's shingle keys, and
    which documents had any shingle."""
    a, b = permutations(num_perm)
    sig = np.full((ndocs, num_perm), np.iinfo(_U32).max, dtype=_U32)
    counts = np.bincount(docs, minlength=ndocs) if len(docs) else np.zeros(ndocs, dtype=np.int64)
    has = counts > 0
    h = fmix32(shingle_hash(keys))
    bounds = np.concatenate(([0], np.cumsum(counts)))
    # Blocks of whole documents, about _CHUNK shingles each.
    cuts = np.unique(np.searchsorted(bounds, np.arange(0, len(h), _CHUNK), side="right") - 1)
    cuts = np.append(cuts[cuts < ndocs], ndocs)

    def block(i: int) -> None:
        d0, d1 = cuts[i], cuts[i + 1]
        s0, s1 = bounds[d0], bounds[d1]
        if s1 == s0:
            return
        # permutations × shingles, so the per-document minimum runs along contiguous memory
        perm = np.multiply.outer(a, h[s0:s1])  # wraps mod 2^32, as the scheme intends
        perm += b[:, None]
        live = np.flatnonzero(has[d0:d1]) + d0
        sig[live] = np.minimum.reduceat(perm, bounds[live] - s0, axis=1).T

    with ThreadPoolExecutor(max_workers=2) as pool:  # numpy releases the GIL in these loops
        list(pool.map(block, range(len(cuts) - 1)))
    return sig, has


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for an LSH at `threshold`, chosen by datasketch's optimiser."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    return lsh.b, lsh.r


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit bucket key per (document, band)."""
    mult = np.random.RandomState(7).randint(1, 1 << 62, size=rows, dtype=np.int64).astype(_U64) | _U64(1)
    out = np.empty((sig.shape[0], bands), dtype=_U64)
    for k in range(bands):
        block = sig[:, k * rows : (k + 1) * rows].astype(_U64)
        key = (block * mult).sum(axis=1, dtype=_U64)
        out[:, k] = key ^ (key >> _U64(29))
    return out


def shared_buckets(keys: np.ndarray) -> np.ndarray:
    """documents × bands: whether another document shares this document's bucket in that band."""
    shared = np.zeros(keys.shape, dtype=bool)
    for k in range(keys.shape[1]):
        order = np.argsort(keys[:, k])
        col = keys[order, k]
        same = col[1:] == col[:-1]
        shared[order[1:][same], k] = True
        shared[order[:-1][same], k] = True
    return shared
