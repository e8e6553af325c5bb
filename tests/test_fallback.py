"""The fallback path: the service LLM answers when local generation fails or is too slow."""

from __future__ import annotations

import threading
import time

import httpx

from llamaduo.config import ServeConfig
from llamaduo.demo.simulator import SimulatedService
from llamaduo.service import ServiceClient
from tests.conftest import service_config
from tests.tiny_server import client, direct, gen, running, tiny  # noqa: F401


def test_fallback_answers_from_the_service_when_local_generation_fails(gen, tmp_path):  # noqa: F811
    def broken(prompts, sampling, seed):
        raise RuntimeError("model crashed")

    with SimulatedService(lambda req: "service says: " + req["messages"][-1]["content"]) as svc:
        service = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        with running(broken, ServeConfig(fallback=True), fallback_client=service) as srv:
            raw = client(srv).chat.completions.with_raw_response.create(
                model="tiny-student", messages=[{"role": "user", "content": "Order 2 lamps"}], max_tokens=8
            )
            stream = list(client(srv).chat.completions.create(
                model="tiny-student", messages=[{"role": "user", "content": "Order 3 lamps"}], stream=True
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


def test_fallback_takes_over_when_local_generation_is_over_the_latency_budget(tiny, gen, tmp_path):  # noqa: F811
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
                model="tiny-student", messages=[{"role": "user", "content": "Hi"}]
            )
            waited = time.monotonic() - t0
            release.set()
            time.sleep(0.05)
            after = client(srv).chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "Hi"}])
        service.close()
    assert raw.headers["x-llamaduo-served-by"] == "service" and raw.parse().choices[0].message.content == "fast service answer"
    assert waited < 3
    assert after.choices[0].message.content == direct(tiny, "Hi") != ""  # local again once it is fast


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
