"""The migration loop end to end: tiny model, loopback service, real training and judging."""

from __future__ import annotations

import json
import sqlite3

import pytest

from llamaduo import loop, stages
from llamaduo.config import from_dict
from llamaduo.demo.task import coverage_records, simulator_responder
from llamaduo.files import read_json
from llamaduo.store import RunStore
from tests.conftest import overlap_judge


def responder(request: dict) -> str:
    """Judge by token overlap with the reference it finds in the prompt; synthesize demo-task pairs."""
    text = "\n".join(m.get("content", "") for m in request.get("messages", []))
    if "<candidate>" in text:
        return overlap_judge(request)
    return simulator_responder(request)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from llamaduo.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def make_config(tmp_path, svc, tiny_model, **over):
    cov = tmp_path / "coverage.jsonl"
    cov.write_text("".join(json.dumps(r) + "\n" for r in coverage_records(36, seed=3)))
    tree = {
        "name": "e2e",
        "runs_dir": str(tmp_path / "runs"),
        "seed": 1,
        "data": {"input": str(cov), "test_fraction": 0.17},
        "service": {
            "base_url": svc.base_url, "model": "fake-model", "api_key_env": "LLAMADUO_TEST_KEY",
            "backoff_base_s": 0.01, "prices": {"fake-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        },
        "judge": {"judgments_per_candidate": 2, "pass_rule": {"threshold": 99}},
        "synth": {"per_round": 24, "pairs_per_call": 4},
        "model": {"base": str(tiny_model)},
        "train": {"method": "full", "learning_rate": 3e-3, "epochs": 2, "batch_size": 8, "max_length": 96},
        "infer": {"num_samples": 2, "max_new_tokens": 24, "temperature": 0.0},
        "loop": {"max_rounds": 3},
    }
    for k, v in over.items():
        tree.setdefault(k, {}).update(v) if isinstance(v, dict) else tree.__setitem__(k, v)
    return from_dict(tree)


def test_two_rounds_end_to_end_with_every_request_logged(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model)
    result = loop.run(cfg, display="quiet")
    store = RunStore(cfg.run_dir)

    assert result.stop_reason == "max_rounds"
    assert [r.round for r in result.rounds] == [0, 1, 2]
    for r in range(3):
        for p in (store.adapter_dir(r), store.predictions_path(r), store.judgments_path(r), store.scores_path(r)):
            assert p.exists(), p
    for r in (1, 2):
        assert store.synthetic_path(r).exists() and store.rejected_path(r).exists()
    assert result.rounds[2].train_examples > result.rounds[0].train_examples
    manifest = read_json(store.manifest_path)
    assert manifest["stop_reason"] == "max_rounds" and set(manifest["rounds"]) == {"r00", "r01", "r02"}
    assert manifest["best_round"] == result.best_round
    assert (store.root / "config.yaml").exists() and store.report_html.exists()

    conn = sqlite3.connect(store.service_db)
    sent = conn.execute("SELECT COUNT(*) FROM calls WHERE status NOT IN ('cached', 'failed')").fetchone()[0]
    assert sent == fake_service.count > 0

    # A rerun with nothing changed resumes to the same end and pays for nothing.
    before = fake_service.count
    again = loop.run(cfg, display="quiet")
    assert again.stop_reason == "max_rounds" and fake_service.count == before
    assert [r.value for r in again.rounds] == [r.value for r in result.rounds]


def test_target_met_stops_early(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, judge={"judgments_per_candidate": 1, "pass_rule": {"threshold": 1}})
    result = loop.run(cfg, display="quiet")
    assert result.stop_reason == "target_met" and len(result.rounds) == 1


def test_budget_stops_the_loop_cleanly(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, service={"max_usd": 1e-9})
    result = loop.run(cfg, display="quiet")
    assert result.stop_reason == "budget"
    assert read_json(RunStore(cfg.run_dir).manifest_path)["stop_reason"] == "budget"


def test_changed_judge_setting_reruns_judging_only(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 1})
    loop.run(cfg, display="quiet")
    events = []
    cfg2 = cfg.model_copy(deep=True)
    cfg2.judge.judgments_per_candidate = 3
    loop.run(cfg2, display=events.append)
    skipped = {e["stage"] for e in events if e["event"] == "stage_skip"}
    invalid = {e["stage"]: e["changed"] for e in events if e["event"] == "invalidated"}
    assert {"prepare", "r00/train", "r00/infer"} <= skipped
    assert invalid == {"r00/judge": ["judge"]}


def test_no_improvement_stops_after_patience_rounds(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 4, "patience": 1, "min_delta": 1000.0})
    result = loop.run(cfg, display="quiet")
    assert result.stop_reason == "no_improvement" and len(result.rounds) == 2


def test_wall_clock_limit_stops_after_the_current_round(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 3, "max_wall_s": 0.001})
    result = loop.run(cfg, display="quiet")
    assert result.stop_reason == "wall_clock" and len(result.rounds) == 1


def test_best_round_is_the_highest_scoring_not_the_last(tmp_path):
    store = RunStore(tmp_path)
    store.init_manifest(seed=0)
    values = [12.0, 40.0, 31.0]
    best = None
    for r, v in enumerate(values):
        best = loop.better_round(best, v, r)
    assert best == (40.0, 1)


def test_growth_schedule_doubles_up_to_the_cap():
    cfg = from_dict({"synth": {"per_round": 100, "growth": "double", "max_per_round": 350}})
    assert [stages.synth_count(cfg, r) for r in (1, 2, 3, 4)] == [100, 200, 350, 350]
    fixed = from_dict({"synth": {"per_round": 100}})
    assert [stages.synth_count(fixed, r) for r in (1, 2, 3)] == [100, 100, 100]


def test_batch_mode_sends_judging_and_synthesis_through_the_batch_api(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, service={"use_batch": True}, loop={"max_rounds": 2})
    cfg.service.backoff_base_s = 0.01
    result = loop.run(cfg, display="quiet")
    paths = [r["path"] for r in fake_service.requests]
    assert result.stop_reason == "max_rounds" and len(result.rounds) == 2
    assert not any(p.endswith("/chat/completions") and "batches" not in p for p in paths)
    # judge r00 and synth r01 at least; judge r01 may be all cache hits when the answers repeat
    assert sum(p.endswith("/batches") for p in paths) >= 2
    assert RunStore(cfg.run_dir).synthetic_path(1).exists()


def test_canary_api_key_never_reaches_the_run_directory_logs_or_report(tmp_path, fake_service, tiny_model, monkeypatch):
    canary = "sk-canary-loop-4f1d2e3c"
    monkeypatch.setenv("LLAMADUO_TEST_KEY", canary)
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 2}, service={"json_retries": 1})
    events = []
    loop.run(cfg, display=events.append)
    assert any(r["headers"].get("authorization") == f"Bearer {canary}" for r in fake_service.requests)
    store = RunStore(cfg.run_dir)
    assert store.report_html.exists() and store.service_db.exists()
    for path in store.root.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    assert canary not in json.dumps(events, default=str)


def test_a_judge_that_answers_only_prose_stops_the_loop_before_paying_for_more(tmp_path, fake_service, tiny_model):
    def prose(request):
        text = "\n".join(m.get("content", "") for m in request.get("messages", []))
        if "<candidate>" in text:
            return "I think this answer is pretty good overall!"  # no JSON at all
        return simulator_responder(request)

    fake_service.responder = prose
    cfg = make_config(tmp_path, fake_service, tiny_model)
    events = []
    result = loop.run(cfg, display=events.append)
    assert result.stop_reason == "judge_failed"
    assert [r.round for r in result.rounds] == [0] and result.rounds[0].value is None and result.best_value is None
    store = RunStore(cfg.run_dir)
    with sqlite3.connect(store.service_db) as db:
        stages = {row[0] for row in db.execute("SELECT DISTINCT stage FROM calls")}
    assert stages == {"judge"}  # no synthesis was paid for
    assert not store.round_dir(1).exists()
    warnings = [e["message"] for e in events if e.get("event") == "warning"]
    assert any("judge.min_valid" in w and "structured_output" in w and "pretty good" in w for w in warnings)
    done = next(e for e in events if e.get("event") == "round_done")
    from llamaduo.progress import format_event

    assert "n/a" in format_event(done) and "0.0" not in format_event(done).split("spend")[0]
    from rich.console import Console

    from llamaduo import views

    con = Console(record=True, width=200)
    con.print(views.status_table(store.root))
    text = con.export_text()
    assert "n/a" in text and "judge_failed" in text


def test_changing_structured_output_reruns_the_judge_naming_it(tmp_path, fake_service, tiny_model):
    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 1})
    loop.run(cfg, display="quiet")
    events = []
    changed = cfg.model_copy(update={"service": cfg.service.model_copy(update={"structured_output": "prompt"})})
    loop.run(changed, display=events.append)
    inval = {e["stage"]: e["changed"] for e in events if e.get("event") == "invalidated"}
    assert inval == {"r00/judge": ["service"]}


def test_mlflow_tracking_holds_every_round_once_with_metrics_settings_and_report(tmp_path, fake_service, tiny_model):
    from mlflow.tracking import MlflowClient

    from llamaduo.tracking import tracking_uri

    fake_service.responder = responder
    cfg = make_config(tmp_path, fake_service, tiny_model, loop={"max_rounds": 2}, tracking={"backend": "mlflow"})
    loop.run(cfg, display="quiet")
    loop.run(cfg, display="quiet")  # resumed: nothing new to log
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("llamaduo")
    runs = client.search_runs([exp.experiment_id])
    rounds = sorted((r for r in runs if r.data.tags.get("llamaduo.kind") == "round"),
                    key=lambda r: int(r.data.tags["llamaduo.round"]))
    parent = next(r for r in runs if r.data.tags.get("llamaduo.kind") == "run")
    assert [r.data.tags["llamaduo.round"] for r in rounds] == ["0", "1"]
    manifest = RunStore(cfg.run_dir).read_manifest()
    for r in rounds:
        rec = manifest.rounds[f"r{int(r.data.tags['llamaduo.round']):02d}"]
        assert r.data.metrics["value"] == rec.value and "precision_mean" in r.data.metrics
        assert r.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
        assert "inputs.train" in r.data.params and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {a.path for a in client.list_artifacts(r.info.run_id, "report")} == {"report/report.html", "report/report.md"}
    history = client.get_metric_history(parent.info.run_id, "value")
    assert sorted(m.step for m in history) == [0, 1]
    assert parent.data.tags["llamaduo.stop_reason"] == manifest.stop_reason
