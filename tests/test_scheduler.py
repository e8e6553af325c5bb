"""The server's continuous batch: rows joining at different steps decode as `generate` does, each
row with its own sampling, seed, token constraint and log-probabilities."""

from __future__ import annotations

import pytest
import torch

from llamaduo.chat_api import ChatRequest
from llamaduo.config import InferConfig, ModelConfig
from llamaduo.data import Message
from llamaduo.infer import generate
from llamaduo.models import load_model
from llamaduo.rowbatch import RowBatch
from llamaduo.rowcache import RowCache, prefill, register
from tests.test_decode import gemma3
from tests.tiny import tiny_model  # noqa: F401

PROMPTS = ["Order 3 mugs", "Omar", "Hello, this is Lukas from Graz. Please send me two water bottles.", "Anna",
           "What is the capital of France?"]


@pytest.fixture(scope="module")
def tiny(tiny_model):  # noqa: F811
    return load_model(ModelConfig(base=str(tiny_model)))


def request(text: str, max_tokens: int = 20, temperature: float = 0.0, seed: int | None = 0, n: int = 1,
            **kw) -> ChatRequest:
    sampling = InferConfig(temperature=temperature, max_new_tokens=max_tokens, num_samples=n, top_p=kw.pop("top_p", 1.0),
                           stop=kw.pop("stop", []))
    return ChatRequest([Message(role="user", content=text)], sampling, seed, n, False, False, **kw)


def run(batch: RowBatch, arrivals: list[tuple[int, ChatRequest]]) -> dict[int, dict]:
    """Add each request at its step (arrivals sorted by step); step until every row is done."""
    out: dict[int, dict] = {}
    pending, step = list(enumerate(arrivals)), 0
    while pending or len(batch):
        events = []
        while pending and pending[0][1][0] <= step:
            key, (_, req) = pending.pop(0)
            out[key] = {"text": [""] * req.n, "finish": [None] * req.n, "logprobs": [[] for _ in range(req.n)],
                        "tokens": [0] * req.n}
            events += batch.add(key, req)
        events += batch.step()
        for e in events:
            o = out[e.key]
            o["text"][e.index] += e.text
            o["logprobs"][e.index] += e.logprobs or []
            o["tokens"][e.index] = e.completion_tokens
            if e.finish_reason:
                o["finish"][e.index] = e.finish_reason
        step += 1
    return out


def test_greedy_rows_joining_at_different_steps_match_generate(tiny):
    model, tok = tiny
    sampling = InferConfig(temperature=0.0, max_new_tokens=20, num_samples=1, batch_size=1)
    expected = [generate(model, tok, [("q", [Message(role="user", content=p)])], sampling)[0] for p in PROMPTS]
    out = run(RowBatch(model, tok), [(3 * i, request(p)) for i, p in enumerate(PROMPTS)])
    assert [out[i]["text"][0] for i in range(len(PROMPTS))] == [c.text for c in expected]
    assert [out[i]["finish"][0] for i in range(len(PROMPTS))] == [c.finish_reason for c in expected]
    assert [out[i]["tokens"][0] for i in range(len(PROMPTS))] == [c.new_tokens for c in expected]


def row_step(model, cache, nxt: list[int], got: list[list[int]], seen: list | None = None) -> list[int]:
    """One greedy decode step of every row of `cache` through the row attention; appends to `got`."""
    from llamaduo.decode import _attention
    from llamaduo.rowcache import ATTENTION

    cache.begin_step()
    if seen is not None:
        seen.append(cache.same_length)
    with _attention(model, ATTENTION):
        out = model(input_ids=torch.tensor(nxt)[:, None], position_ids=cache.lengths[:, None], use_cache=False,
                    row_cache=cache)
    cache.end_step()
    nxt = out.logits[:, -1].argmax(-1).tolist()
    for row, t in enumerate(nxt):
        got[row].append(t)
    return nxt


def test_row_cache_decodes_a_sliding_window_model_like_generate():
    model = gemma3(sliding_window=4)
    register()
    prompts = [[5, 9, 2, 7, 7, 3], [11, 4], [8, 1, 6, 6, 2, 9, 10, 12, 3]]
    expected = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]

    cache, nxt, got = RowCache(), [], []
    with torch.inference_mode():
        for i, p in enumerate(prompts):  # each joins one step after the last
            keys, values, last = prefill(model, p)
            cache.add(keys, values)
            nxt.append(int(last.argmax()))
            got.append([nxt[-1]])
            if i == len(prompts) - 1:
                break
            nxt = row_step(model, cache, nxt, got)
        while min(len(g) for g in got) < 12:
            nxt = row_step(model, cache, nxt, got)
    assert [g[:12] for g in got] == expected



def test_rows_of_one_length_take_the_unmasked_path_and_still_decode_like_generate():
    # Two rows of the same prompt, a window of 4: the first steps see every column (no mask), later
    # ones only the window (masked); and the slice write replaces the scatter throughout.

    model = gemma3(sliding_window=4)
    register()
    p = [5, 9]
    expected = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
    cache, seen = RowCache(), []
    with torch.inference_mode():
        keys, values, last = prefill(model, p)
        cache.add(keys, values, copies=2)
        nxt = [int(last.argmax())] * 2
        got = [nxt[:1], nxt[1:]]
        while len(got[0]) < 10:
            nxt = row_step(model, cache, nxt, got, seen)
    assert got == [expected, expected] and seen == list(range(2, 11))

class OnlySequence:
    """A token constraint that allows exactly one fixed token sequence, then ends the row."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.at = tokens, 0

    def mask_logits(self, logits) -> None:
        keep = logits[self.tokens[self.at]].clone()
        logits.fill_(float("-inf"))
        logits[self.tokens[self.at]] = keep

    def accept(self, token_id: int) -> None:
        assert token_id == self.tokens[self.at]
        self.at += 1

    def is_finished(self) -> bool:
        return self.at == len(self.tokens)


def test_constrained_and_free_rows_share_a_batch_and_the_constraint_decides_its_row(tiny):
    model, tok = tiny
    forced = tok.encode('{"quantity": 42}', add_special_tokens=False)
    free = request(PROMPTS[0])
    reqs = [free, request(PROMPTS[1], constraint=lambda: OnlySequence(forced)),
            request(PROMPTS[2], temperature=1.0, seed=3, constraint=lambda: OnlySequence(forced), n=2)]
    out = run(RowBatch(model, tok), [(0, r) for r in reqs])
    sampling = InferConfig(temperature=0.0, max_new_tokens=20, num_samples=1, batch_size=1)
    [plain] = generate(model, tok, [("q", free.messages)], sampling)
    assert out[0]["text"] == [plain.text]
    assert out[1]["text"] == ['{"quantity": 42}'] and out[1]["finish"] == ["stop"]
    assert out[2]["text"] == ['{"quantity": 42}'] * 2 and out[2]["finish"] == ["stop", "stop"]
    assert out[1]["tokens"] == [len(forced)]


def test_logprobs_are_consistent_with_the_text(tiny):
    model, tok = tiny
    out = run(RowBatch(model, tok), [(0, request(PROMPTS[0], logprobs=5)), (1, request(PROMPTS[2], logprobs=0)),
                                     (1, request(PROMPTS[3], temperature=1.0, logprobs=3))])
    for key, top in ((0, 5), (1, 0), (2, 3)):
        entries, text = out[key]["logprobs"][0], out[key]["text"][0]
        assert len(entries) == out[key]["tokens"][0] > 0
        # Token by token the bytes add up to the text (a token may hold part of a character).
        assert b"".join(bytes(e["bytes"]) for e in entries).decode(errors="replace").strip() == text
        assert all(e["logprob"] <= 0 for e in entries)
        assert all(e["token"] == bytes(e["bytes"]).decode() for e in entries if "\ufffd" not in e["token"])
        for e in entries:
            lps = [t["logprob"] for t in e["top_logprobs"]]
            assert len(lps) == top and lps == sorted(lps, reverse=True)
            if key == 0:  # greedy: the chosen token is the most likely one
                assert e["top_logprobs"][0]["token"] == e["token"]
                assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])


def test_same_seed_samples_the_same_text_and_no_seed_a_fresh_one(tiny):
    model, tok = tiny
    batch = RowBatch(model, tok)
    seeded = [request(PROMPTS[1], temperature=1.0, seed=7, max_tokens=16) for _ in range(2)]
    unseeded = [request(PROMPTS[1], temperature=1.0, seed=None, max_tokens=16) for _ in range(2)]
    # The two seeded requests decode in batches of different company and still agree.
    a = run(batch, [(0, seeded[0]), (0, unseeded[0]), (2, request(PROMPTS[0]))])
    b = run(batch, [(0, unseeded[1]), (1, seeded[1])])
    assert a[0]["text"] == b[1]["text"]
    assert a[1]["text"] != b[0]["text"]


def test_stop_strings_and_max_tokens_end_rows_with_their_finish_reason(tiny):
    model, tok = tiny
    sampling = InferConfig(temperature=0.0, max_new_tokens=20, num_samples=1, batch_size=1)
    [plain] = generate(model, tok, [("q", [Message(role="user", content=PROMPTS[2])])], sampling)
    stop = plain.text[4:6]
    out = run(RowBatch(model, tok), [(0, request(PROMPTS[2], stop=[stop])), (0, request(PROMPTS[2], max_tokens=3))])
    assert out[0]["text"][0] == plain.text[: plain.text.find(stop)].strip() and out[0]["finish"] == ["stop"]
    assert out[1]["finish"] == ["length"] and out[1]["tokens"] == [3]
