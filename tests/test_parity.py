"""accept --endpoint: any OpenAI-compatible server (Ollama's /v1, vLLM) judged like an exported artifact,
with the deploy.max_drop gate and deploy/parity.json."""

from __future__ import annotations

from llamaduo.demo.simulator import SimulatedService
from tests.test_accept import accept_run, judge_round, judge_service  # noqa: F401


def test_an_endpoint_that_answers_like_the_round_passes_the_gate(tmp_path, judge_service):  # noqa: F811
    from llamaduo.parity import run_parity

    cfg, store, answers = accept_run(tmp_path)
    judge_round(cfg, store, judge_service, answers)
    with SimulatedService(lambda req: answers[req["messages"][-1]["content"]]) as endpoint:
        parity = run_parity(cfg, store, judge_service, endpoint=endpoint.base_url, model="served")
    row = parity.row("endpoint")
    assert row is not None and row.error is None and row.runtime == endpoint.base_url
    assert row.value == parity.round_value and row.difference == 0.0 and row.rejected is False
    assert row.identical == 1.0 and row.tokens_per_s is not None and row.prompts == 6
    assert parity.shipped == "endpoint" and parity.shipped_rejected is False
    assert store.read_parity() == parity  # what was written reads back as the same type


def test_an_endpoint_that_lost_quality_is_rejected_by_the_gate(tmp_path, judge_service):  # noqa: F811
    from llamaduo.parity import run_parity

    cfg, store, answers = accept_run(tmp_path)
    judge_round(cfg, store, judge_service, answers)
    degraded = {p: (a if i % 3 == 0 else "sorry") for i, (p, a) in enumerate(answers.items())}
    with SimulatedService(lambda req: degraded[req["messages"][-1]["content"]]) as endpoint:
        parity = run_parity(cfg, store, judge_service, endpoint=endpoint.base_url, model="served")
    row = parity.row("endpoint")
    assert row.difference < -cfg.deploy.max_drop and row.difference_ci[1] < 0 and row.rejected is True
    assert parity.shipped_rejected is True and parity.passes_instead == []
    assert row.identical is not None and row.identical < 0.5
