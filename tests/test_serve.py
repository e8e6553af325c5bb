"""The OpenAI-compatible server on a tiny real model, driven by the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from llamaduo.config import Config, ServeConfig
from llamaduo.serve import create_app, resolve_model_dir, start_background
from llamaduo.store import RunStore
from tests.tiny_server import QUESTIONS, client, direct, gen, running, tiny, untrained  # noqa: F401


def test_chat_completion_answers_like_generate_and_is_marked_local(tiny, gen):  # noqa: F811
    with running(gen) as srv:
        raw = client(srv).chat.completions.with_raw_response.create(
            model="tiny-student", messages=[{"role": "user", "content": QUESTIONS[0]}]
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


def test_bearer_key_is_required_when_configured(gen, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LLAMADUO_SERVE_KEY", "sk-serve-secret")
    with running(gen, ServeConfig(api_key_env="LLAMADUO_SERVE_KEY")) as srv:
        with pytest.raises(openai.AuthenticationError) as err:
            client(srv, "sk-wrong").chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "hi"}])
        anonymous = httpx.post(srv.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        ok = client(srv, "sk-serve-secret").chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "hi"}])
        health = httpx.get(srv.base_url.removesuffix("/v1") + "/health")
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert anonymous.status_code == 401
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
    assert ok.choices[0].message.content is not None and health.status_code == 200


def test_metrics_ask_for_the_api_key_unless_made_public(gen, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LLAMADUO_SERVE_KEY", "sk-serve-secret")
    with running(gen, ServeConfig(api_key_env="LLAMADUO_SERVE_KEY")) as srv:
        url = srv.base_url.removesuffix("/v1") + "/metrics"
        anonymous = httpx.get(url)
        keyed = httpx.get(url, headers={"Authorization": "Bearer sk-serve-secret"})
    with running(gen, ServeConfig(api_key_env="LLAMADUO_SERVE_KEY", metrics_public=True)) as srv:
        public = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert keyed.status_code == 200 and "llamaduo_requests" in keyed.text
    assert public.status_code == 200


def test_a_request_past_its_deadline_is_a_504_and_leaves_the_server_free():
    import time

    def slow(prompts, sampling, seed):
        if any("slow" in m[-1].content for _, m in prompts):
            time.sleep(1.5)
        return [type("Out", (), {"text": "done"})() for _ in prompts for _ in range(sampling.num_samples)]

    with running(slow, ServeConfig(request_timeout_s=0.3)) as srv:
        t0 = time.perf_counter()
        late = httpx.post(srv.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "slow"}]})
        took = time.perf_counter() - t0
        streamed = httpx.post(srv.base_url + "/chat/completions",
                              json={"stream": True, "messages": [{"role": "user", "content": "slow"}]})
        time.sleep(1.5)  # the generator finishes its sleep
        ok = client(srv).chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "fast"}])
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout" and took < 1.2
    assert "request_timeout_s" in late.json()["error"]["message"]
    assert streamed.status_code == 504 and streamed.json()["error"]["code"] == "timeout"
    assert ok.choices[0].message.content == "done"


def test_a_stream_past_its_deadline_ends_with_a_timeout_event(untrained):  # noqa: F811
    from llamaduo.serve import local_engine

    model, tok = untrained  # writes noise: it does not stop on its own before the deadline
    cfg = ServeConfig(request_timeout_s=0.8, max_tokens_limit=4096)
    with running(local_engine(model, tok, 4), cfg, tokenizer=tok) as srv:
        r = httpx.post(srv.base_url + "/chat/completions", timeout=60, json={
            "stream": True, "max_tokens": 4000, "temperature": 1.0, "seed": 1, "n": 16,  # one of 16 goes on
            "messages": [{"role": "user", "content": "Order 3 mugs"}]})
        ok = client(srv).chat.completions.create(model="tiny-student", max_tokens=4,
                                                 messages=[{"role": "user", "content": "Anna"}])
    if r.status_code == 504:  # on a slow machine the deadline can pass before the first token
        assert r.json()["error"]["code"] == "timeout"
    else:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "timeout" and "[DONE]" not in events
    assert ok.choices[0].message.content is not None


def test_named_key_variable_that_is_unset_refuses_to_start(gen, monkeypatch):  # noqa: F811
    from llamaduo.errors import UserError

    monkeypatch.delenv("LLAMADUO_UNSET_KEY", raising=False)
    with pytest.raises(UserError, match="LLAMADUO_UNSET_KEY"):
        create_app(gen, ServeConfig(api_key_env="LLAMADUO_UNSET_KEY"), "m")


def test_oversized_body_is_413_and_bad_requests_are_400_in_openai_shape(gen):  # noqa: F811
    with running(gen, ServeConfig(max_body_bytes=2048, max_tokens_limit=64)) as srv:
        url = srv.base_url + "/chat/completions"
        big = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 5000}]})
        chunked = httpx.post(url, content=iter([b'{"messages": [', b" " * 4000, b"]}"]))
        with pytest.raises(openai.BadRequestError) as too_many:
            client(srv).chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "x"}], max_tokens=65)
        not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
        no_messages = httpx.post(url, json={"model": "tiny-student"})
        bad_role = httpx.post(url, json={"messages": [{"role": "narrator", "content": "x"}]})
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


def test_a_run_directory_serves_its_deployed_model(tiny, tmp_path):  # noqa: F811
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
