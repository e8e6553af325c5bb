"""Similarity measures: normalised words, bit-parallel ROUGE-L, and MinHash signatures equal to datasketch's."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from llamaduo import similarity


def lcs_dp(a: list[str], b: list[str]) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_normalize_folds_case_unicode_forms_and_whitespace():
    assert similarity.normalize("  Ｈello\u00a0 WORLD\n\tagain ") == "hello world again"
    assert similarity.words("It's 42°C — fine!") == ["it", "s", "42", "c", "fine"]


def test_rouge_l_f1_matches_the_dynamic_programming_lcs():
    rng = random.Random(3)
    for _ in range(200):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        want = 2 * lcs_dp(a, b) / (len(a) + len(b)) if a and b else float(not a and not b)
        assert similarity.rouge_l_f1(a, b) == pytest.approx(want)
    assert similarity.rouge_l_f1("the cat sat".split(), "the cat sat".split()) == 1.0


@pytest.mark.parametrize("shingle", [1, 3])
def test_vectorised_signatures_equal_datasketch_minhash(shingle):
    docs = [("Summarise the report", "The report says sales rose in May and fell in June."), ("Hi", "Hello there"), ("", "")]
    vocab = similarity.TokenHashes()
    th, lens = similarity.flatten(docs, vocab)
    keys, owner = similarity.ngram_keys(th, lens, shingle, short=True)
    sig, has = similarity.signatures(keys, owner, len(docs), 128)
    assert has.tolist() == [True, True, False]
    for d in (0, 1):
        m = MinHash(num_perm=128, seed=1, scheme="affine32", hashfunc=lambda k: int(similarity.shingle_hash(np.array([k], dtype=np.uint64))[0]))
        for k in keys[owner == d].tolist():
            m.update(k)
        assert np.array_equal(sig[d], m.hashvalues), f"document {d}"


def test_tokens_split_text_exactly_as_the_word_pattern_does():
    texts = ["It's 42°C — fine!", "naïve café, straße", "tabs\tand\x1fcontrol\x00chars", "", "   ", "snake_case x2",
             "ＦＵＬＬ width", "emoji 🙂 between", "it’s curly"]
    got = similarity.tokens(texts)
    assert [[t.decode() for t in toks] for toks in got] == [similarity._WORD.findall(t) for t in texts]
    assert similarity.tokens([]) == []
    # Token hashes are keyed by bytes but equal those of the same token as text.
    vocab = similarity.TokenHashes()
    assert vocab[b"caf\xc3\xa9"] == vocab["café"]
