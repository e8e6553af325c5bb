"""`llamaduo serve` on its continuous batch, driven by the official openai client: tokens stream as
they are produced, requests with different settings share steps, a client that leaves frees its
rows, and several LoRA runs on one base answer under their own names."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import openai
import pytest

from llamaduo.config import Config, InferConfig, ModelConfig, ServeConfig
from llamaduo.data import Message
from llamaduo.errors import UserError
from llamaduo.infer import generate
from llamaduo.models import load_model
from llamaduo.scheduler import Scheduler
from llamaduo.serve import BackgroundServer, build_app, create_app
from tests.tiny import tiny_model  # noqa: F401
from tests.tiny_server import DEFAULTS, QUESTIONS, client, direct, tiny  # noqa: F401


def engine_server(model, tok, cfg: ServeConfig | None = None, defaults: InferConfig = DEFAULTS):
    cfg = cfg or ServeConfig(max_batch=16)
    app = create_app(Scheduler(model, tok, cfg.max_batch), cfg, "tiny-student", defaults=defaults)
    return BackgroundServer(app, model_name="tiny-student"), app


@pytest.fixture(scope="module")
def untrained(tiny_model):  # noqa: F811
    """The untrained tiny model rarely ends a turn: long generations to watch streaming on."""
    return load_model(ModelConfig(base=str(tiny_model)))


def test_streamed_chunks_arrive_while_the_answer_is_still_being_generated(untrained):
    model, tok = untrained
    srv, _ = engine_server(model, tok)
    with srv:
        c = client(srv)
        t0 = time.perf_counter()
        stream = c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Omar"}], max_tokens=400,
                                           stream=True, stream_options={"include_usage": True})
        arrivals, chunks = [], []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - t0)
        total = time.perf_counter() - t0
        whole = c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Omar"}], max_tokens=400)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(arrivals) > 3 and arrivals[0] < total / 2  # a stream gets at most a chunk every stream_interval_ms
    assert streamed == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 400 == whole.usage.completion_tokens


def test_a_first_token_goes_out_alone_and_later_tokens_at_most_every_handover_gap(untrained):
    from tests.test_scheduler import request

    model, tok = untrained

    async def main():
        engine = Scheduler(model, tok, 4)
        engine.start()
        try:
            stream = engine.submit(request("Omar", max_tokens=200))
            t0 = time.monotonic()
            batches = [await stream.next()]
            while (events := await stream.next()) is not None:
                batches.append(events)
            return batches, time.monotonic() - t0, stream.choices[0]
        finally:
            await engine.stop()

    batches, took, choice = asyncio.run(main())
    gap = ServeConfig().stream_interval_ms / 1000  # the engine's default
    assert [e.completion_tokens for e in batches[0]] == [1]  # handed over before the next decode step
    assert batches[-1][-1].finish_reason == "length" and choice.completion_tokens == 200
    assert len(batches) <= 2 + took / gap + 1  # coalesced: not one hand-over per token
    assert "".join(e.text for b in batches for e in b) == choice.text


def test_concurrent_requests_with_different_settings_share_steps_and_greedy_answers_stay(tiny):  # noqa: F811
    _, model, tok = tiny
    srv, app = engine_server(model, tok)

    async def ask_all() -> list:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)

        async def streamed(q: str) -> str:
            s = await c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": q}], stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        jobs = [c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
        jobs += [streamed(q) for q in QUESTIONS]
        jobs += [c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": q}], temperature=1.0,
                                           top_p=0.9, max_tokens=5 + i, n=2) for i, q in enumerate(QUESTIONS)]
        out = await asyncio.gather(*jobs)
        await c.close()
        return out

    with srv:
        out = asyncio.run(ask_all())
    n = len(QUESTIONS)
    expected = [direct(tiny, q) for q in QUESTIONS]
    assert [r.choices[0].message.content for r in out[:n]] == expected and len(set(expected)) > 1
    assert out[n: 2 * n] == expected
    assert all(len(r.choices) == 2 and r.usage.completion_tokens <= 2 * (5 + i) for i, r in enumerate(out[2 * n:]))
    assert app.state.batcher.stats.largest > 2


def test_same_seed_same_sample_and_unseeded_samples_differ(untrained):
    model, tok = untrained
    srv, _ = engine_server(model, tok)
    with srv:
        c = client(srv)

        def ask(**kw) -> str:
            r = c.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Anna"}], temperature=1.0,
                                          max_tokens=24, **kw)
            return r.choices[0].message.content

        seeded, unseeded = [ask(seed=11), ask(seed=11)], [ask(), ask()]
    assert seeded[0] == seeded[1] and unseeded[0] != unseeded[1]


def test_a_client_that_disconnects_leaves_the_batch_and_its_stream_ends_quietly(untrained, caplog):
    model, tok = untrained
    srv, app = engine_server(model, tok)
    engine = app.state.batcher
    body = {"model": "tiny-student", "messages": [{"role": "user", "content": "Omar"}], "max_tokens": 2000, "stream": True}
    with srv:
        for streaming in (True, False):
            with httpx.Client(timeout=30) as h:
                if streaming:
                    with h.stream("POST", srv.base_url + "/chat/completions", json=body) as r:
                        next(r.iter_lines())
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        h.post(srv.base_url + "/chat/completions", json={**body, "stream": False}, timeout=0.5)
            t0 = time.monotonic()
            while len(engine.batch) and time.monotonic() - t0 < 5:
                time.sleep(0.02)
            assert len(engine.batch) == 0 and time.monotonic() - t0 < 3
        steps = engine.stats.batches
    assert steps < 2 * 2000  # neither request ran to its 2000 tokens
    # The stream's response ends when its watcher cancels it: no generation error is logged for it.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# ------------------------------------------------------------------ many runs on one base
def lora(base_path, out, seed: int):
    """A LoRA adapter with random (non-zero) weights, saved as training would save it."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(ModelConfig(base=str(base_path)))
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            lora_alpha=64))
    peft.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_two_runs_on_one_base_answer_under_their_own_names_from_one_process(tiny_model, tmp_path):  # noqa: F811
    a, b = lora(tiny_model, tmp_path / "shop-a", 1), lora(tiny_model, tmp_path / "shop-b", 2)
    sampling = InferConfig(temperature=0.0, max_new_tokens=12, num_samples=1, batch_size=1)
    expected = {}
    for path in (a, b):
        model, tok = load_model(ModelConfig(base=str(tiny_model)), adapter=path)
        expected[path.name] = [generate(model, tok, [("q", [Message(role="user", content=q)])], sampling)[0].text
                               for q in QUESTIONS]
    assert expected["shop-a"] != expected["shop-b"]
    cfg = Config(model={"base": str(tiny_model)}, infer={"temperature": 0.0, "max_new_tokens": 12})
    app, first = build_app([a, b], cfg)

    async def ask_all(srv) -> dict:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        names = ["shop-a", "shop-b"]
        rs = await asyncio.gather(*[c.chat.completions.create(model=n, messages=[{"role": "user", "content": q}])
                                    for q in QUESTIONS for n in names])
        listed = await c.models.list()
        with pytest.raises(openai.NotFoundError) as unknown:
            await c.chat.completions.create(model="shop-c", messages=[{"role": "user", "content": "x"}])
        await c.close()
        return {"answers": rs, "listed": [m.id for m in listed.data], "unknown": unknown.value}

    with BackgroundServer(app) as srv:
        got = asyncio.run(ask_all(srv))
    answers = {n: [r.choices[0].message.content for r in got["answers"] if r.model == n] for n in ("shop-a", "shop-b")}
    assert answers == expected and first == "shop-a" and got["listed"] == ["shop-a", "shop-b"]
    assert got["unknown"].status_code == 404 and got["unknown"].body["code"] == "model_not_found"
    assert app.state.batcher.stats.largest > 1  # the two adapters' requests shared decode steps


def test_a_full_fine_tune_cannot_share_a_base_and_is_named(tiny_model, tmp_path):  # noqa: F811
    from llamaduo.store import RunStore

    a = lora(tiny_model, tmp_path / "shop-a", 1)
    store = RunStore(tmp_path / "full-run")
    store.init_manifest(0)
    model, tok = load_model(ModelConfig(base=str(tiny_model)))
    model.save_pretrained(store.adapter_dir(0))
    cfg = Config(model={"base": str(tiny_model)})
    with pytest.raises(UserError, match="full-run: trained with method=full"):
        build_app([a, store.root], cfg)


def test_serve_stream_interval_ms_sets_how_often_a_stream_gets_its_tokens(tiny_model):  # noqa: F811
    from tests.test_scheduler import request

    async def batches(engine) -> list:
        engine.start()
        try:
            stream = engine.submit(request("Omar", max_tokens=20))
            got = []
            while (events := await stream.next()) is not None:
                got.append(events)
            return got
        finally:
            await engine.stop()

    every, _ = build_app(tiny_model, Config(serve={"stream_interval_ms": 0}))
    assert every.state.batcher.handover_gap_s == 0
    alone = [len(b) for b in asyncio.run(batches(every.state.batcher))]
    rare, _ = build_app(tiny_model, Config(serve={"stream_interval_ms": 60_000}))
    together = [len(b) for b in asyncio.run(batches(rare.state.batcher))]
    # Every step's text goes out as decoded; whatever the event loop has not taken yet rides along
    # with the next hand-over, so some tokens arrive together, but many more hand-overs than two.
    assert len(alone) > 5 and sum(alone) > 15
    assert len(together) == 2 and together[0] == 1 and sum(together) == sum(alone)  # the first at once, the rest at the end
