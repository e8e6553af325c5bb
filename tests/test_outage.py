"""A service outage is not a result: the stage fails, the loop stops, the rerun retries exactly what failed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter

import pytest
import yaml

from llamaduo import loop
from llamaduo.artifacts import StageKey
from llamaduo.store import RunStore
from tests.test_loop import make_config, responder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from llamaduo.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


class Outage:
    """Answers the first `answered` calls, then takes the service down (503 for every call) until healed."""

    def __init__(self, svc, answered: int):
        self.svc, self.answered = svc, answered
        self.ok: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request: dict) -> str:
        with self.lock:
            self.ok.append(key(request))
            if len(self.ok) == self.answered:  # once: healing is the test's to do
                self.svc.outage_status = 503
        return responder(request)


def key(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


def test_an_outage_stops_the_loop_and_the_rerun_resends_only_the_failed_calls(tmp_path, fake_service, tiny_model):
    outage = Outage(fake_service, answered=3)
    fake_service.responder = outage
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 2},
                      service={"max_retries": 1, "backoff_max_s": 0.05})
    store = RunStore(cfg.run_dir)

    first = loop.run(cfg, display="quiet")
    assert first.stop_reason == "service_unavailable" and "failed after retries" in (first.detail or "")
    assert store.stage_record(StageKey.step("judge", 0)).status == "failed"
    assert first.rounds == []  # no round was recorded from failed calls
    answered = set(outage.ok)
    sent = Counter(key(r["body"]) for r in fake_service.requests)
    failed_calls = set(sent - Counter(outage.ok))
    failed_n = sum(1 for j in store.read_judgments(0) if not j.ok and j.raw is None)
    assert failed_n > 0

    # The CLI says so in one line and exits 3 while the service is still down.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = subprocess.run([sys.executable, "-m", "llamaduo.cli", "run", str(tmp_path / "c.yaml"), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped: judge r00:") and "service calls failed" in last
    assert "Traceback" not in res.stderr

    fake_service.outage_status = None
    before = len(outage.ok)
    healed = loop.run(cfg, display="quiet")
    assert healed.stop_reason == "max_rounds" and [r.round for r in healed.rounds] == [0, 1]
    after = outage.ok[before:]
    # Exactly the calls that failed went out again; the answered ones came from the cache.
    assert sum(k in failed_calls for k in after) == failed_n
    assert not [k for k in after if k in answered and k not in failed_calls]
