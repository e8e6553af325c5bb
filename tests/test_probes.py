"""Bias probes through the real judge path (template, ServiceClient, reply schema) against the
loopback simulator: an honest judge passes them, a judge that rewards length is flagged."""

from __future__ import annotations

import json
import re

import pytest

from llamaduo import probes
from llamaduo.config import from_dict
from llamaduo.data import make_example
from llamaduo.files import write_jsonl
from llamaduo.service import ServiceClient
from llamaduo.store import RunStore
from tests.conftest import overlap_judge, service_config

TESTS = [
    ("Name the capital of France.", "Paris is the capital city of France, on the Seine river."),
    ("List three primary colours.", "Red, blue and yellow are the three primary colours of paint."),
    ("Convert 3 km to metres.", "Three kilometres equal exactly 3000 metres in total length."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around 1600 in London."),
]


def length_judge(request: dict) -> str:
    """A biased judge: the longer the candidate, the higher both scores."""
    text = "\n".join(m.get("content", "") for m in request.get("messages", []))
    cand = re.search(r"<candidate>\n?(.*?)\n?</candidate>", text, re.S)
    score = min(100, 20 + len(cand.group(1)) // 4) if cand else 1
    return json.dumps({"similarity": {"score": score, "reason": "long"}, "precision": {"score": score, "reason": "long"}})


@pytest.fixture
def run(tmp_path, fake_service):
    store = RunStore(tmp_path / "run")
    write_jsonl(store.test_path, [make_example(q, a, category="qa") for q, a in TESTS])
    cfg = from_dict({
        "name": "run", "runs_dir": str(tmp_path),
        "service": service_config(fake_service).model_dump(mode="json"),
        "judge": {"judgments_per_candidate": 2},
    })
    client = ServiceClient(cfg.service, db_path=store.service_db)
    yield cfg, store, client
    client.close()


def results(cal):
    return {p.probe: p for p in cal.probes}


def test_an_honest_judge_passes_every_probe_and_a_rerun_is_free(run, fake_service):
    cfg, store, client = run
    fake_service.responder = overlap_judge
    cal = probes.probe(cfg, store, client)
    got = results(cal)
    assert set(got) == set(probes.PROBES) and cal.probe_items == 4
    assert all(p.passed for p in got.values()), [(p.probe, p.value) for p in got.values() if not p.passed]
    assert got["reference"].precision == 100 and got["empty"].precision == 1
    sent = fake_service.count
    assert sent == 4 * 7 * 2  # items × (probes + the unswapped pair) × judgments
    assert cal.cost.calls == sent and cal.cost.usd > 0
    again = probes.probe(cfg, store, client)
    assert fake_service.count == sent  # every probe call is a cache hit
    assert results(again)["padded"].value == got["padded"].value and again.cost.usd == cal.cost.usd
    assert store.read_calibration().probes == again.probes


def test_the_probes_flag_a_judge_that_rewards_length(run, fake_service):
    cfg, store, client = run
    fake_service.responder = length_judge
    got = results(probes.probe(cfg, store, client))
    assert got["padded"].passed is False and got["padded"].value > probes.GAIN
    assert got["injection"].passed is False  # the longer, instruction-carrying answer gains
    assert got["reference"].passed is False  # a short reference scores low with this judge
    assert got["empty"].passed is True  # empty is short, so low: the one probe length alone passes


def test_unparseable_judge_replies_leave_the_probes_unmeasured(run, fake_service):
    cfg, store, client = run
    fake_service.responder = lambda req: "I think it is fine."
    got = results(probes.probe(cfg, store, client))
    assert all(p.passed is None and p.value is None and p.failed > 0 for p in got.values())
