"""The prompt-prefix cache: a prompt that starts like a cached one prefills only the rest, and gets
what its full prefill gives; answers served with it are the ones served without it."""

from __future__ import annotations

import pytest
import torch

from llamaduo.chat_api import ChatRequest
from llamaduo.config import InferConfig, ModelConfig, ServeConfig
from llamaduo.data import Message
from llamaduo.models import load_model
from llamaduo.prefixcache import BLOCK, PrefixCache, common_prefix
from llamaduo.rowbatch import RowBatch
from llamaduo.rowcache import prefill
from tests.test_decode import gemma3
from tests.test_scheduler import run
from tests.tiny import tiny_model  # noqa: F401


def counted(model: torch.nn.Module) -> list[int]:
    """The number of tokens each forward of `model` runs."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    return seen


def tensors(n: int, length: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    return [torch.zeros(1, 1, length, n)], [torch.zeros(1, 1, length, n)], torch.zeros(n)


def test_common_prefix_counts_the_shared_leading_tokens():
    assert common_prefix((1, 2, 3, 4), (1, 2, 9)) == 2
    assert common_prefix((1, 2), (1, 2, 3)) == 2
    assert common_prefix((5,), (1,)) == 0
    assert common_prefix((), (1,)) == 0


def test_lookup_takes_the_longest_prefix_of_the_same_adapter_and_leaves_the_last_token_to_run():
    cache = PrefixCache(1 << 20, block=2)
    cache.store(None, [1, 2, 3, 4, 5, 6], *tensors(4))
    cache.store(None, [1, 2, 3, 4, 5, 6, 7, 8, 9], *tensors(4))
    cache.store("task-b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], *tensors(4))
    hit = cache.lookup(None, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert hit is not None and hit.tokens == 8 and not hit.whole
    # A prompt that is a cached prompt's beginning: all but its last token, whose logits are needed.
    assert cache.lookup(None, [1, 2, 3, 4, 5, 6, 7]).tokens == 6
    whole = cache.lookup(None, [1, 2, 3, 4, 5, 6])
    assert whole.whole and whole.tokens == 6
    assert cache.lookup(None, [1, 9, 9, 9, 9, 9]) is None  # less than a block shared
    assert cache.lookup(None, [1, 2, 3, 9, 9, 9]).tokens == 3  # a block, then token by token
    assert cache.lookup("task-c", [1, 2, 3, 4, 5, 6]) is None  # another adapter's keys are not this one's
    assert cache.hits == 4 and cache.lookups == 6 and cache.reused_tokens == 8 + 6 + 6 + 3
    assert BLOCK == 16 and PrefixCache(1).block == BLOCK


def test_among_many_prompts_the_deepest_shared_block_names_the_most_recent_entry():
    cache = PrefixCache(1 << 30, block=4)
    for i in range(2000):
        cache.store(None, [1, 2, 3, 4, i, 5, 6, 7, 8, 9], *tensors(1))
    hit = cache.lookup(None, [1, 2, 3, 4, 77, 5, 6, 7, 0])
    assert hit.tokens == 8 and hit.entry is cache._entries[(None, (1, 2, 3, 4, 77, 5, 6, 7, 8, 9))]
    # Sharing the first block only: the entry used last (the hit above) answers.
    assert cache.lookup(None, [1, 2, 3, 4, 5000, 0]).entry is hit.entry


def test_the_least_recently_used_prompts_go_beyond_the_budget():
    one = sum(t.numel() * t.element_size() for t in (*tensors(4)[0], *tensors(4)[1], tensors(4)[2]))
    cache = PrefixCache(2 * one, block=2)
    for first in (1, 2, 3):
        cache.store(None, [first, 5, 6, 7, 8, 9], *tensors(4))
        cache.lookup(None, [1, 5, 6, 7, 8, 9])  # keeps the first one recent
    assert len(cache) == 2 and cache.bytes == 2 * one
    assert cache.lookup(None, [1, 5, 6, 7, 8, 9]).whole and cache.lookup(None, [2, 5, 6, 7, 8, 9]) is None
    off = PrefixCache(0)
    off.store(None, [1, 2, 3, 4, 5], *tensors(4))
    assert len(off) == 0 and off.lookup(None, [1, 2, 3, 4, 5]) is None


@pytest.mark.parametrize("shared", [4, 11, 19])
def test_a_prefilled_prefix_runs_only_the_rest_and_gives_the_full_prefills_keys_and_logits(shared):
    model = gemma3(sliding_window=4)  # sliding-window layers whose window the prompt outgrows
    ids = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    other = ids[:shared] + [(t + 1) % 250 + 3 for t in ids[shared:]]
    cache = PrefixCache(1 << 24, block=4)
    runs = counted(model)
    with torch.inference_mode():
        keys, values, last = prefill(model, ids)
        cache.store(None, ids, keys, values, last)
        full = prefill(model, other)
        reuse = cache.lookup(None, other)
        got = prefill(model, other, reuse)
    assert reuse.tokens == shared and runs == [20, 20, 20 - shared]
    for a, b in zip(full[0] + full[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(full[2], got[2], rtol=0, atol=1e-5)
    # The cached prompt's own tensors were not written by the reuse.
    assert all(torch.equal(k, e) for k, e in zip(keys, cache.lookup(None, ids).entry.keys, strict=True))


@pytest.fixture(scope="module")
def tiny(tiny_model):  # noqa: F811
    return load_model(ModelConfig(base=str(tiny_model)))


def test_served_answers_are_the_same_with_the_cache_and_the_shared_prompt_is_prefilled_once(tiny):
    model, tok = tiny
    system = "You are the order desk of a shop in Porto. Answer with the order as JSON, nothing else."
    asks = ["Two blue mugs for Maria.", "Cancel my desk lamp.", "Five phone cases to Graz.", "Two blue mugs for Maria."]
    sampling = InferConfig(temperature=0.0, max_new_tokens=12, num_samples=1)
    reqs = [ChatRequest([Message(role="system", content=system), Message(role="user", content=q)], sampling, 0, 1,
                        False, False) for q in asks]
    off, on = RowBatch(model, tok, prefix_cache_bytes=0), RowBatch(model, tok)
    runs = counted(model)
    plain = run(off, [(i, r) for i, r in enumerate(reqs)])
    without = sum(runs)
    runs.clear()
    cached = run(on, [(i, r) for i, r in enumerate(reqs)])
    assert [o["text"] for o in cached.values()] == [o["text"] for o in plain.values()]
    prompt = len(reqs[3].prompt_ids(tok))  # the repeated prompt: all of it reused, nothing run
    assert on.prefixes.hits == 3 and on.prefixes.reused_tokens > 2 * len(tok(system)["input_ids"]) + prompt
    assert sum(runs) < without - on.prefixes.reused_tokens + 1  # the reused tokens did not run again
    assert ServeConfig().prefix_cache_mb > 0 and on.prefixes.budget == int(ServeConfig().prefix_cache_mb * 2**20)


def test_a_shared_system_prompt_is_served_from_the_cache_and_counted_in_the_metrics(tiny):
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from llamaduo.serve import local_engine
    from tests.tiny_server import running

    model, tok = tiny
    system = "You are the order desk of a shop in Porto. Answer with the order as JSON, nothing else."
    with running(local_engine(model, tok, 4), ServeConfig(metrics_public=True), tokenizer=tok) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0)
        answers = [client.chat.completions.create(
            model="tiny-student", max_tokens=8, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}]).choices[0].message.content
            for q in ("Two mugs.", "Two mugs.")]
        text = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert answers[0] == answers[1]
    # The probe's prompt and the first request were looked up and missed; the repeat was a whole hit.
    assert samples["llamaduo_prefix_cache_hits_total"] == 1 and samples["llamaduo_prefix_cache_lookups_total"] == 3
    assert samples["llamaduo_prefix_cache_reused_tokens_total"] > len(tok(system)["input_ids"])
    assert samples["llamaduo_prefix_cache_bytes"] > 0


def test_the_served_cache_takes_its_budget_from_the_config_and_off_shows_no_series(tiny_model):  # noqa: F811
    import httpx

    from llamaduo.config import Config
    from llamaduo.serve import BackgroundServer, build_app

    for mb, budget in ((0.5, 2**19), (0, 0)):
        app, _ = build_app(tiny_model, Config(model={"base": str(tiny_model)}, serve={"prefix_cache_mb": mb,
                                                                                      "metrics_public": True}))
        assert app.state.batcher.batch.prefixes.budget == budget
        with BackgroundServer(app) as srv:
            text = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
        assert ("llamaduo_prefix_cache_lookups_total" in text) == (budget > 0)
