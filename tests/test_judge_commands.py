"""`llamaduo calibrate` and `llamaduo probe` as a user runs them: a subprocess against the simulator."""

from __future__ import annotations

import json

from llamaduo.artifacts import Completion, Judgment
from llamaduo.config import dump_config, from_dict
from llamaduo.data import make_example
from llamaduo.files import atomic_write_text, write_jsonl
from llamaduo.store import RunStore
from tests.conftest import overlap_judge, service_config
from tests.test_cli import run

SCORES = [20, 40, 60, 80, 90, 95]


def make_run(tmp_path, svc) -> RunStore:
    store = RunStore(tmp_path / "run")
    cfg = from_dict({"name": "run", "runs_dir": str(tmp_path), "service": service_config(svc).model_dump(mode="json"),
                     "judge": {"judgments_per_candidate": 1}})
    atomic_write_text(store.config_path, dump_config(cfg))
    store.init_manifest(0)
    tests = [make_example(f"Question {i}?", f"The answer to question {i} is {i * 7}.") for i in range(3)]
    write_jsonl(store.test_path, tests)
    preds, rows, labels = [], [], []
    for k, s in enumerate(SCORES):
        ex = tests[k // 2]
        preds.append(Completion(prompt_id=ex.id, sample_index=k % 2, text=f"maybe {k}"))
        rows.append(Judgment(prompt_id=ex.id, sample_index=k % 2, judge_index=0, ok=True, similarity=s, precision=s,
                             judge_model="fake-model"))
        labels.append({"round": 0, "prompt_id": ex.id, "sample_index": k % 2, "score": min(100, s + 5)})
    store.write_predictions(0, preds)
    store.write_judgments(0, rows)
    write_jsonl(store.labels_path, labels)
    return store


def test_calibrate_prints_agreement_and_probes_and_adds_the_judge_card(tmp_path, fake_service):
    fake_service.responder = overlap_judge
    store = make_run(tmp_path, fake_service)
    res = run("calibrate", store.root, "--items", 3)
    assert res.returncode == 0, res.stderr
    assert "Spearman" in res.stdout and "1.00" in res.stdout and "padded" in res.stdout
    cal = json.loads(store.calibration_path.read_text())
    assert cal["judges"][0]["spearman"] == 1.0 and cal["probe_items"] == 3
    assert all(p["passed"] for p in cal["probes"]) and cal["cost"]["calls"] == fake_service.count
    assert "Bias probes" in store.report_html.read_text()
    again = run("probe", store.root, "--items", 3)  # reruns are cache hits
    assert again.returncode == 0 and json.loads(store.calibration_path.read_text())["judges"] == cal["judges"]
    assert json.loads(store.calibration_path.read_text())["cost"]["calls"] == cal["cost"]["calls"]


def test_calibrate_names_each_bad_label_line_and_exits_2(tmp_path, fake_service):
    store = make_run(tmp_path, fake_service)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"round": 0, "prompt_id": "x", "sample_index": 0, "score": 0}\n{"round": 0}\n')
    res = run("calibrate", store.root, "--labels", bad, "--no-probes")
    assert res.returncode == 2 and fake_service.count == 0
    assert f"{bad}:1: field 'score':" in res.stderr and f"{bad}:2: field 'prompt_id':" in res.stderr
