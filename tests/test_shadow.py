"""Shadow evaluation: sampled live requests answered by the service off the request path, stored, judged."""

from __future__ import annotations

import time

from llamaduo.demo.simulator import SimulatedService
from tests.monitoring import ask, config, responder, sender, serve, service_answers, student, task_a


def test_shadowing_at_rate_one_stores_and_judges_every_request(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_KEY", "sk-caller-secret-123")
    answers = service_answers()
    known = dict(task_a(i) for i in range(20))
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path, api_key_env="SERVE_KEY")
        shadow, store, _ = sender(cfg, tmp_path, rate=1.0)
        with serve(student(known), cfg, shadow=shadow) as srv:
            for n in range(12):
                reply = ask(srv, task_a(n)[0], key="sk-caller-secret-123")
                assert reply.http_response.status_code == 200
            ask(srv, "Mail anna@example.com the order of 2 mugs", key="sk-caller-secret-123")
            assert shadow.drain(30)
    pairs = store.pairs()
    assert len(pairs) == 13 and {p.status for p in pairs} == {"judged"}
    assert shadow.counts["judged"] == 13 and shadow.counts["sent"] == 13
    assert all(p.score == 100 for p in pairs[:12])  # the student answers task A like the service
    assert pairs[0].service_answer == task_a(0)[1] and pairs[0].local_answer == task_a(0)[1]
    assert pairs[0].reasons["precision"] and pairs[0].service_latency_ms is not None
    assert "[REDACTED:email]" in pairs[-1].messages[0]["content"]  # redacted like capture
    store.close()
    raw = (tmp_path / "monitor.sqlite").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("monitor.sqlite-*"))
    assert b"sk-caller-secret-123" not in raw and b"anna@example.com" not in raw
    assert shadow.spend_usd > 0  # priced from the call log, stages shadow + shadow_judge


def test_shadowing_at_a_quarter_samples_about_a_quarter_of_requests(tmp_path):
    answers = service_answers()
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path)
        shadow, store, _ = sender(cfg, tmp_path, rate=0.25)
        with serve(student(answers), cfg, shadow=shadow) as srv:
            for n in range(80):
                assert ask(srv, task_a(n)[0]).http_response.status_code == 200
            assert shadow.drain(30)
    stored = len(store.pairs(status="judged"))
    assert shadow.counts["offered"] == 80 and stored == shadow.counts["sampled"]
    assert 12 <= stored <= 28, stored  # seeded: the same share on every run


def test_a_service_that_is_down_does_not_touch_client_responses(tmp_path):
    """The service hangs past its timeout: clients still get the local answer at local speed, and the
    small queue fills up and drops shadow work (counted) instead of blocking."""
    known = dict(task_a(i) for i in range(40))
    with SimulatedService(lambda req: "late", latency_s=5.0) as svc:
        cfg = config(svc, tmp_path, shadow_queue=2, shadow_batch=1)
        cfg.service.timeout_s, cfg.service.max_retries = 1.0, 0
        shadow, store, _ = sender(cfg, tmp_path, rate=1.0)
        with serve(student(known), cfg) as plain, serve(student(known), cfg, shadow=shadow) as shadowed:
            lat = {}
            for name, srv in (("plain", plain), ("shadowed", shadowed)):
                ask(srv, task_a(0)[0])  # warm
                t0 = time.perf_counter()
                for n in range(20):
                    reply = ask(srv, task_a(n)[0])
                    assert reply.http_response.status_code == 200
                    assert reply.parse().choices[0].message.content == task_a(n)[1]
                    assert reply.headers["x-llamaduo-served-by"] == "local"
                lat[name] = (time.perf_counter() - t0) / 20
    assert lat["shadowed"] < lat["plain"] + 0.05, lat  # nowhere near the service's 1 s timeout
    assert shadow.dropped()["queue_full"] > 0
    shadow.stop()
    assert all(p.status in ("pending", "failed") for p in store.pairs())


def test_shadow_work_stops_at_the_shadow_budget_and_counts_what_it_dropped(tmp_path):
    from llamaduo.shadow import ShadowItem

    answers = service_answers()
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path, shadow_max_usd=1e-9)
        shadow, store, _ = sender(cfg, tmp_path, rate=1.0)
        items = [ShadowItem([{"role": "user", "content": task_a(n)[0]}], task_a(n)[1], "m", float(n)) for n in range(4)]
        shadow.process(items[:2])  # the first batch is paid for and crosses the budget
        shadow.process(items[2:])
    assert shadow.spend_usd >= 1e-9 and len(store.pairs()) == 2
    assert shadow.dropped() == {"budget": 2}


def test_streamed_answers_are_shadowed_and_their_first_token_is_timed(tmp_path):
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    answers = service_answers()
    known = dict(task_a(i) for i in range(20))
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path)
        shadow, store, _ = sender(cfg, tmp_path, rate=1.0)
        with serve(student(known), cfg, shadow=shadow) as srv:
            api = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
            for n in range(4):
                chunks = api.chat.completions.create(model="tiny-student", stream=True,
                                                     messages=[{"role": "user", "content": task_a(n)[0]}])
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == task_a(n)[1]
            assert shadow.drain(30)
            text = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    pairs = store.pairs()
    assert len(pairs) == 4 and {p.status for p in pairs} == {"judged"} and all(p.score == 100 for p in pairs)
    assert pairs[0].local_answer == task_a(0)[1]  # the whole streamed answer, not its first chunk
    store.close()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = sum(s.value for s in fams["llamaduo_time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    out = sum(s.value for s in fams["llamaduo_tokens_out"].samples if s.name == "llamaduo_tokens_out_total")
    assert ttft == 4 and out == 4 * 5
