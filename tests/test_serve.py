"""The OpenAI-compatible server on a tiny real model, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from llamaduo.config import Config, InferConfig, ServeConfig
from llamaduo.data import Message, make_example
from llamaduo.demo.simulator import SimulatedService
from llamaduo.demo.tiny import build_tiny_model
from llamaduo.infer import generate
from llamaduo.models import load_model
from llamaduo.serve import BackgroundServer, create_app, local_generator, resolve_model_dir, start_background
from llamaduo.service import ServiceClient
from llamaduo.store import RunStore
from llamaduo.train import train
from tests.conftest import service_config

DEFAULTS = InferConfig(temperature=0.0, max_new_tokens=16, num_samples=1)
QUESTIONS = ["Order 3 mugs", "Omar", "Hello, this is Lukas from Graz. Please send me two water bottles.", "Anna"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model after a few seconds of training, so greedy answers are visible, prompt-dependent text."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base")
    examples = [make_example(f"Order {i} mugs", f'{{"item": "mug", "quantity": {i}}}') for i in range(1, 9)]
    examples += [make_example(w, f"Hello {w}!") for w in ("Anna", "Omar", "Lukas", "Sofia")]
    train_cfg = {"method": "full", "learning_rate": 3e-3, "max_steps": 60, "batch_size": 8, "max_length": 64,
                 "warmup_ratio": 0.0, "logging_steps": 100}
    train(Config(model={"base": str(base)}, train=train_cfg), examples, root / "model")
    model, tok = load_model(Config(model={"base": str(root / "model")}).model)
    return root / "model", model, tok


@pytest.fixture(scope="module")
def gen(tiny):
    _, model, tok = tiny
    return local_generator(model, tok)


def direct(tiny, question: str, max_new_tokens: int = 16) -> str:
    _, model, tok = tiny
    sampling = DEFAULTS.model_copy(update={"max_new_tokens": max_new_tokens, "batch_size": 1})
    [c] = generate(model, tok, [("q", [Message(role="user", content=question)])], sampling)
    return c.text


def running(generator, cfg: ServeConfig | None = None, **kw) -> BackgroundServer:
    app = create_app(generator, cfg or ServeConfig(), "tiny-student", defaults=DEFAULTS, **kw)
    return BackgroundServer(app, model_name="tiny-student")


def client(srv: BackgroundServer, key: str = "not-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)


def test_chat_completion_answers_like_generate_and_is_marked_local(tiny, gen):
    with running(gen) as srv:
        raw = client(srv).chat.completions.with_raw_response.create(
            model="whatever-the-app-used", messages=[{"role": "user", "content": QUESTIONS[0]}]
        )
        r = raw.parse()
        models = client(srv).models.list()
        health = httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()
    assert raw.headers["x-llamaduo-served-by"] == "local"
    assert r.choices[0].message.content == direct(tiny, QUESTIONS[0]) and r.choices[0].message.content.startswith("{")
    assert r.model == "tiny-student" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 3 and 0 < r.usage.completion_tokens <= 16
    assert r.model_extra["llamaduo_fallback"] is False
    assert [m.id for m in models.data] == ["tiny-student"] and health["status"] == "ok"


def test_streaming_sends_openai_chunks_and_ends_with_done(tiny, gen):
    with running(gen) as srv:
        stream = client(srv).chat.completions.create(
            model="m", messages=[{"role": "user", "content": QUESTIONS[1]}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        with httpx.stream(
            "POST", srv.base_url + "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        ) as resp:
            lines = [ln for ln in resp.iter_lines() if ln]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct(tiny, QUESTIONS[1]) != ""
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_concurrent_requests_are_batched_without_changing_greedy_answers(tiny, gen):
    calls: list[tuple[int, float]] = []

    def recording(prompts, sampling, seed):
        calls.append((len(prompts), sampling.temperature))
        return gen(prompts, sampling, seed)

    async def ask_all(srv) -> list[str]:
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        rs = await asyncio.gather(
            *[c.chat.completions.create(model="m", messages=[{"role": "user", "content": q}]) for q in QUESTIONS * 2]
        )
        await c.close()
        return [r.choices[0].message.content for r in rs]

    with running(recording, ServeConfig(max_batch=8, batch_wait_ms=200)) as srv:
        answers = asyncio.run(ask_all(srv))
    expected = [direct(tiny, q) for q in QUESTIONS * 2]
    assert answers == expected and all(expected) and len(set(expected)) > 1
    assert sum(n for n, _ in calls) == 8 and max(n for n, _ in calls) > 1


def test_requests_with_different_sampling_are_generated_in_separate_groups(gen):
    calls: list[tuple[int, float, int]] = []

    def recording(prompts, sampling, seed):
        calls.append((len(prompts), sampling.temperature, sampling.num_samples))
        return gen(prompts, sampling, seed)

    async def ask(srv):
        c = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        rs = await asyncio.gather(
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], temperature=0),
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "b"}], temperature=0),
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "c"}], temperature=0.7, n=3),
        )
        await c.close()
        return rs

    with running(recording, ServeConfig(batch_wait_ms=200)) as srv:
        rs = asyncio.run(ask(srv))
    # Arrival timing decides how the two greedy requests are grouped; sampling never mixes.
    assert sum(n for n, t, _ in calls if t == 0.0) == 2
    assert [(n, k) for n, t, k in calls if t == 0.7] == [(1, 3)]
    assert [len(r.choices) for r in rs] == [1, 1, 3] and [c.index for c in rs[2].choices] == [0, 1, 2]


def test_bearer_key_is_required_when_configured(gen, monkeypatch):
    monkeypatch.setenv("LLAMADUO_SERVE_KEY", "sk-serve-secret")
    with running(gen, ServeConfig(api_key_env="LLAMADUO_SERVE_KEY")) as srv:
        with pytest.raises(openai.AuthenticationError) as err:
            client(srv, "sk-wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        anonymous = httpx.post(srv.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        ok = client(srv, "sk-serve-secret").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        health = httpx.get(srv.base_url.removesuffix("/v1") + "/health")
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert anonymous.status_code == 401
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
    assert ok.choices[0].message.content is not None and health.status_code == 200


def test_named_key_variable_that_is_unset_refuses_to_start(gen, monkeypatch):
    from llamaduo.errors import UserError

    monkeypatch.delenv("LLAMADUO_UNSET_KEY", raising=False)
    with pytest.raises(UserError, match="LLAMADUO_UNSET_KEY"):
        create_app(gen, ServeConfig(api_key_env="LLAMADUO_UNSET_KEY"), "m")


def test_oversized_body_is_413_and_bad_requests_are_400_in_openai_shape(gen):
    with running(gen, ServeConfig(max_body_bytes=2048, max_tokens_limit=64)) as srv:
        url = srv.base_url + "/chat/completions"
        big = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 5000}]})
        chunked = httpx.post(url, content=iter([b'{"messages": [', b" " * 4000, b"]}"]))
        with pytest.raises(openai.BadRequestError) as too_many:
            client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=65)
        not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
        no_messages = httpx.post(url, json={"model": "m"})
        bad_role = httpx.post(url, json={"messages": [{"role": "tool", "content": "x"}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert chunked.status_code == 413
    assert too_many.value.status_code == 400 and too_many.value.body["param"] == "max_tokens"
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages[0].role"
    for r in (big, not_json, no_messages, bad_role):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_failing_local_model_without_fallback_is_a_500_server_error():
    def broken(prompts, sampling, seed):
        raise RuntimeError("CUDA out of memory")

    with running(broken) as srv:
        r = httpx.post(srv.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "CUDA out of memory" in r.json()["error"]["message"]


def test_fallback_answers_from_the_service_when_local_generation_fails(gen, tmp_path):
    def broken(prompts, sampling, seed):
        raise RuntimeError("model crashed")

    with SimulatedService(lambda req: "service says: " + req["messages"][-1]["content"]) as svc:
        service = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        with running(broken, ServeConfig(fallback=True), fallback_client=service) as srv:
            raw = client(srv).chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "Order 2 lamps"}], max_tokens=8
            )
            stream = list(client(srv).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Order 3 lamps"}], stream=True
            ))
            health = httpx.get(srv.base_url.removesuffix("/v1") + "/health").json()
        ledger = service.ledger()
        service.close()
    r = raw.parse()
    assert raw.headers["x-llamaduo-served-by"] == "service"
    assert r.choices[0].message.content == "service says: Order 2 lamps" and r.model == "fake-model"
    assert r.model_extra["llamaduo_fallback"] is True
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "service says: Order 3 lamps"
    assert all(c.model_extra["llamaduo_fallback"] for c in stream)
    assert svc.requests[0]["body"]["messages"] == [{"role": "user", "content": "Order 2 lamps"}]
    assert health["fallbacks"] == 2 and ledger["total"]["calls"] == 2


def test_fallback_takes_over_when_local_generation_is_over_the_latency_budget(tiny, gen, tmp_path):
    release = threading.Event()

    def slow(prompts, sampling, seed):
        release.wait(5)
        return gen(prompts, sampling, seed)

    with SimulatedService(lambda req: "fast service answer") as svc:
        service = ServiceClient(service_config(svc), db_path=None)
        cfg = ServeConfig(fallback=True, latency_budget_s=0.3)
        with running(slow, cfg, fallback_client=service) as srv:
            t0 = time.monotonic()
            raw = client(srv).chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "Hi"}]
            )
            waited = time.monotonic() - t0
            release.set()
            time.sleep(0.05)
            after = client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        service.close()
    assert raw.headers["x-llamaduo-served-by"] == "service" and raw.parse().choices[0].message.content == "fast service answer"
    assert waited < 3
    assert after.choices[0].message.content == direct(tiny, "Hi") != ""  # local again once it is fast


def test_a_run_directory_serves_its_deployed_model(tiny, tmp_path):
    path, model, tok = tiny
    store = RunStore(tmp_path / "shop-run")
    store.init_manifest(0)
    model.save_pretrained(store.merged_dir)
    tok.save_pretrained(store.merged_dir)
    assert resolve_model_dir(store.root) == (store.merged_dir, "shop-run")
    assert resolve_model_dir(store.merged_dir)[1] == "shop-run"
    cfg = Config(infer={"temperature": 0.0, "max_new_tokens": 16})
    srv = start_background(store.root, cfg)
    try:
        r = client(srv).chat.completions.create(model="shop-run", messages=[{"role": "user", "content": QUESTIONS[0]}])
    finally:
        srv.stop()
    assert r.model == "shop-run" and r.choices[0].message.content == direct(tiny, QUESTIONS[0]) != ""
    assert json.loads((store.merged_dir / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_lone_client_does_not_wait_for_a_batch_to_fill(gen):
    with running(gen, ServeConfig(max_batch=8, batch_wait_ms=3000)) as srv:
        c = client(srv)
        t0 = time.monotonic()
        for _ in range(3):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Anna"}])
        took = time.monotonic() - t0
    assert took < 3.0  # three requests, each far quicker than one 3 s gathering wait


def test_when_local_and_service_both_fail_the_answer_is_a_502(tmp_path):
    from llamaduo.demo.simulator import Fault

    def broken(prompts, sampling, seed):
        raise RuntimeError("model crashed")

    with SimulatedService(lambda req: "unused") as svc:
        svc.inject(*[Fault.server_error(503)] * 3)
        service = ServiceClient(service_config(svc, max_retries=2), db_path=None)
        with running(broken, ServeConfig(fallback=True), fallback_client=service) as srv:
            r = httpx.post(srv.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        service.close()
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "fallback_failed" and "model crashed" in err["message"]
