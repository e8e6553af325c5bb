"""Shared fixtures: the loopback service-LLM simulator, a config pointing at it, a scripted judge."""

from __future__ import annotations

import json
import re

import pytest

from llamaduo.config import ServiceConfig
from llamaduo.demo.simulator import SimulatedService


def overlap_judge(request: dict) -> str:
    """A fake judge that scores from the text it is sent: token overlap of candidate vs reference."""
    text = "\n".join(m.get("content", "") for m in request.get("messages", []))
    ref = re.search(r"<reference>\n?(.*?)\n?</reference>", text, re.S)
    cand = re.search(r"<candidate>\n?(.*?)\n?</candidate>", text, re.S)
    if not ref or not cand:
        return json.dumps({"contents": []})
    a, b = set(re.findall(r"\w+", ref.group(1).lower())), set(re.findall(r"\w+", cand.group(1).lower()))
    score = max(1, round(100 * len(a & b) / max(1, len(a | b))))
    return json.dumps(
        {"similarity": {"score": score, "reason": f"overlap {score}"}, "precision": {"score": score, "reason": "overlap"}}
    )


@pytest.fixture
def fake_service():
    """A real OpenAI-compatible HTTP server on 127.0.0.1; set `.responder` to script it."""
    with SimulatedService(lambda req: '{"ok": true}') as svc:
        yield svc


def service_config(svc: SimulatedService, **kw) -> ServiceConfig:
    base = {
        "base_url": svc.base_url,
        "model": "fake-model",
        "api_key_env": "LLAMADUO_TEST_KEY",
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.2,
        "timeout_s": 2.0,
        "max_retries": 3,
        "prices": {"fake-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
    }
    base.update(kw)
    return ServiceConfig(**base)
