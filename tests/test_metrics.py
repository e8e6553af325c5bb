"""`GET /metrics` in Prometheus text format, and monitoring windows in the run's MLflow run."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llamaduo.demo.simulator import SimulatedService
from llamaduo.service import ServiceClient
from tests.monitoring import ask, config, responder, sender, serve, service_answers, student, task_a, task_b


def _families(srv) -> dict:
    text = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fam, name: str, **labels) -> float:
    return sum(s.value for s in fam.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_parse_and_hold_the_named_series(tmp_path):
    answers = service_answers()
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path, fallback=True)
        shadow, store, drift = sender(cfg, tmp_path, rate=1.0, drift=True)
        fallback = ServiceClient(cfg.service, db_path=tmp_path / "service.sqlite")
        with serve(student(dict(task_a(i) for i in range(50))), cfg, fallback_client=fallback, shadow=shadow,
                   drift=drift) as srv:
            assert "llamaduo_shadow_score" not in _families(srv)  # no window yet: absent, not 0
            for n in range(8):
                ask(srv, task_b(n)[0])
            assert shadow.drain(30) and drift.drifted
            for n in range(3):
                assert ask(srv, task_a(n)[0]).headers["x-llamaduo-served-by"] == "service"
            assert shadow.drain(30)
            fams = _families(srv)
    fallback.close()
    for name in ("llamaduo_requests", "llamaduo_request_latency_seconds", "llamaduo_time_to_first_token_seconds",
                 "llamaduo_tokens_in", "llamaduo_tokens_out", "llamaduo_batch_size", "llamaduo_fallbacks",
                 "llamaduo_shadow_requests", "llamaduo_shadow_dropped", "llamaduo_shadow_score",
                 "llamaduo_shadow_spend_usd", "llamaduo_drifted"):
        assert name in fams, name
    assert _value(fams["llamaduo_requests"], "llamaduo_requests_total", model="tiny-student", status="200") == 8
    assert _value(fams["llamaduo_requests"], "llamaduo_requests_total", model="fake-model", status="200") == 3
    assert _value(fams["llamaduo_fallbacks"], "llamaduo_fallbacks_total", reason="drift") == 3
    assert _value(fams["llamaduo_request_latency_seconds"], "llamaduo_request_latency_seconds_count") == 11
    assert _value(fams["llamaduo_tokens_out"], "llamaduo_tokens_out_total", model="tiny-student") == 8 * 5
    assert _value(fams["llamaduo_shadow_requests"], "llamaduo_shadow_requests_total", outcome="judged") == 11
    assert _value(fams["llamaduo_shadow_score"], "llamaduo_shadow_score") == 1.0
    assert _value(fams["llamaduo_drifted"], "llamaduo_drifted") == 1.0
    assert _value(fams["llamaduo_shadow_spend_usd"], "llamaduo_shadow_spend_usd") > 0
    assert _value(fams["llamaduo_batch_size"], "llamaduo_batch_size_sum") == 8 + 3  # 3 local probes while drifted


def test_monitoring_windows_are_logged_to_the_runs_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from llamaduo.store import RunStore
    from llamaduo.tracking import make_tracker, tracking_uri

    answers = service_answers()
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path)
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"backend": "mlflow"})})
        tracker = make_tracker(cfg, RunStore(cfg.run_dir))
        shadow, store, drift = sender(cfg, tmp_path, rate=1.0, drift=True, tracker=tracker)
        for n in range(8):
            shadow.enqueue([{"role": "user", "content": task_a(n)[0]}], task_a(n)[1])
        for n in range(8):
            shadow.enqueue([{"role": "user", "content": task_b(n)[0]}], "no idea")
        shadow.start()
        assert shadow.drain(30)
        shadow.stop()
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(tracker.parent_id, "monitor.value")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 100.0), (2, 1.0)]
    drifted = MlflowClient(tracking_uri(cfg)).get_metric_history(tracker.parent_id, "monitor.drifted")
    assert sorted((m.step, m.value) for m in drifted) == [(1, 0.0), (2, 1.0)]


def test_each_served_run_drifts_on_its_own_traffic_and_only_its_requests_fall_back(tmp_path):
    import openai

    from llamaduo.serve import BackgroundServer, create_app
    from llamaduo.served import ServedModel
    from tests.monitoring import DEFAULTS

    answers = service_answers()
    with SimulatedService(responder(answers)) as svc:
        cfg = config(svc, tmp_path, fallback=True)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        shadow_a, store_a, drift_a = sender(cfg, tmp_path / "a", rate=1.0, drift=True)
        shadow_b, store_b, drift_b = sender(cfg, tmp_path / "b", rate=1.0, drift=True)
        fallback = ServiceClient(cfg.service, db_path=tmp_path / "service.sqlite")
        models = [ServedModel(n, None, cfg.serve, DEFAULTS, fallback, "fake-model") for n in ("run-a", "run-b")]
        app = create_app(student(dict(task_a(i) for i in range(50))), cfg.serve, "run-a", defaults=DEFAULTS,
                         models=models, shadow={"run-a": shadow_a, "run-b": shadow_b},
                         drift={"run-a": drift_a, "run-b": drift_b})
        with BackgroundServer(app, model_name="run-a") as srv:
            api = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)

            def ask_as(model: str, prompt: str):
                return api.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": prompt}])

            for n in range(8):  # run-a's traffic moves to a task it never learnt; run-b's stays on its task
                ask_as("run-a", task_b(n)[0])
                ask_as("run-b", task_a(n)[0])
            assert shadow_a.drain(30) and shadow_b.drain(30)
            assert drift_a.drifted and not drift_b.drifted
            served_by = {m: ask_as(m, task_a(9)[0]).headers["x-llamaduo-served-by"] for m in ("run-a", "run-b")}
            fams = _families(srv)
    fallback.close()
    assert served_by == {"run-a": "service", "run-b": "local"}
    assert len(store_a.pairs()) >= 8 and all(p.model == "run-a" for p in store_a.pairs())
    assert len(store_b.pairs()) == 9 and all(p.model == "run-b" for p in store_b.pairs())  # 8 + the last ask
    assert _value(fams["llamaduo_drifted"], "llamaduo_drifted", model="run-a") == 1.0
    assert _value(fams["llamaduo_drifted"], "llamaduo_drifted", model="run-b") == 0.0
    store_a.close()
    store_b.close()
