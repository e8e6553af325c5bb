"""Calibration against people: Spearman's ρ and Cohen's κ of the judge against planted labels, their
prompt-level bootstrap CIs, label validation, the merge of label writes, and judge.require_kappa."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from llamaduo import calibrate, loop, scoring
from llamaduo.artifacts import Calibration, JudgeAgreement, Judgment, Label, PassDecision, Scores
from llamaduo.config import from_dict
from llamaduo.files import write_jsonl
from llamaduo.ingest import DataError
from llamaduo.labels import merge_labels, read_labels
from llamaduo.store import RunStore

JUDGE = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]  # judge's precision of candidates 0..9 (prompt i // 2, sample i % 2)
HUMAN_RANK = [2, 1, 4, 3, 6, 5, 8, 7, 10, 9]  # adjacent pairs swapped: Σd² = 10
RHO = 1 - 6 * 10 / (10 * (10**2 - 1))  # 0.939393…
# Pass at 70: the judge passes candidates 6-9. People pass 5, 6, 7, 8:
# both pass 3, judge only 1, people only 1, neither 5 → p_o 0.8, p_e 0.4·0.4 + 0.6·0.6 = 0.52.
HUMAN_PASS = [False, False, False, False, False, True, True, True, True, False]
KAPPA = (0.8 - 0.52) / (1 - 0.52)


def cfg_for(tmp_path, **judge):
    return from_dict({"name": "run", "runs_dir": str(tmp_path), "service": {"model": "judge-a"},
                      "judge": {"pass_rule": {"metric": "precision", "threshold": 70}, **judge}})


def planted_run(tmp_path, models=("judge-a",)) -> RunStore:
    store = RunStore(tmp_path / "run")
    rows = [
        Judgment(prompt_id=f"p{i // 2}", sample_index=i % 2, judge_index=0, ok=True, similarity=s, precision=s,
                 precision_reason="r", judge_model=m)
        for m in models for i, s in enumerate(JUDGE)
    ]
    store.write_judgments(0, rows)
    labels = [{"round": 0, "prompt_id": f"p{i // 2}", "sample_index": i % 2, "score": 10 * HUMAN_RANK[i],
               "passed": HUMAN_PASS[i]} for i in range(10)]
    labels.append({"round": 0, "prompt_id": "p-unknown", "sample_index": 0, "score": 50})
    write_jsonl(store.labels_path, labels)
    return store


def test_calibrate_on_planted_labels_gives_the_known_rho_and_kappa(tmp_path):
    store = planted_run(tmp_path)
    cal = calibrate.calibrate(cfg_for(tmp_path), store)  # no client: agreement only
    [j] = cal.judges
    assert j.judge == "judge-a" and j.scored == 10 and j.classified == 10
    assert j.spearman == pytest.approx(RHO, abs=1e-4) and j.kappa == pytest.approx(KAPPA, abs=1e-4)
    assert j.agreement == pytest.approx(0.8)
    assert cal.labels == 11 and cal.matched == 10 and cal.unmatched == 1 and cal.threshold == 70
    lo, hi = j.spearman_ci
    assert lo <= RHO <= hi and lo >= -1 and hi <= 1
    assert store.read_calibration() == cal  # written typed, read back typed


def test_a_panel_is_calibrated_per_judge_and_as_a_whole(tmp_path):
    store = planted_run(tmp_path, models=("judge-a", "judge-b"))
    cal = calibrate.calibrate(cfg_for(tmp_path), store)
    assert [j.judge for j in cal.judges] == ["judge-a", "judge-b", "panel"]
    assert all(j.kappa == pytest.approx(KAPPA, abs=1e-4) for j in cal.judges)
    assert cal.deciding().judge == "panel"


def test_spearman_and_kappa_match_reference_computations():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    x = [rng.randint(1, 10) for _ in range(40)]  # ties on purpose
    y = [v + rng.randint(-3, 3) for v in x]
    assert calibrate.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    a = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert calibrate.cohen_kappa(a, b) == pytest.approx(0.4)  # p_o 0.7, p_e 0.5·0.6 + 0.5·0.4
    assert calibrate.cohen_kappa([True, True], [True, True]) is None  # chance agreement is 1: undefined
    assert calibrate.spearman([1, 1, 1], [1, 2, 3]) is None


def test_the_bootstrap_resamples_prompts_like_a_plain_reference_loop():
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    x = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    y = np.array([2.0, 1, 4, 3, 6, 5, 8, 7])
    got = calibrate.cluster_bootstrap_ci(lambda i: calibrate.spearman(x[i], y[i]), groups, resamples=200, seed=5)
    rng, keys, vals = np.random.default_rng(5), ["a", "b", "c", "d"], []
    for _ in range(200):
        idx = [n for k in rng.integers(0, 4, size=4) for n, g in enumerate(groups) if g == keys[k]]
        v = calibrate.spearman(x[idx], y[idx])
        if v is not None:
            vals.append(v)
    assert got == [round(float(q), 4) for q in np.percentile(vals, [2.5, 97.5])]


def test_bad_label_lines_are_each_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        json.dumps({"round": 0, "prompt_id": "p0", "sample_index": 0, "score": 80}) + "\n"
        + json.dumps({"round": 0, "prompt_id": "p0", "sample_index": 1, "score": 150}) + "\n"
        + "not json\n"
        + json.dumps({"prompt_id": "p1", "sample_index": 0, "passed": True}) + "\n"
        + json.dumps({"round": 0, "prompt_id": "p1", "sample_index": 0}) + "\n"
    )
    with pytest.raises(DataError) as e:
        read_labels(path)
    lines = e.value.details()
    assert any(f"{path}:2: field 'score':" in ln for ln in lines)
    assert any(f"{path}:3:" in ln and "not JSON" in ln for ln in lines)
    assert any(f"{path}:4: field 'round':" in ln for ln in lines)
    assert any(f"{path}:5:" in ln and "needs a score" in ln for ln in lines)
    assert len(lines) == 4


def test_label_writes_merge_by_candidate_and_concurrent_writers_lose_nothing(tmp_path):
    store = RunStore(tmp_path / "run")
    merge_labels(store, [Label(round=0, prompt_id="p0", sample_index=0, passed=True, agree=True)])
    merge_labels(store, [Label(round=0, prompt_id="p0", sample_index=0, score=35)])  # keeps the agree
    threads = [threading.Thread(target=merge_labels, args=(store, [Label(round=1, prompt_id=f"q{i}", sample_index=0, score=50)]))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = {lb.key: lb for lb in read_labels(store.labels_path)}
    assert labels[(0, "p0", 0)].score == 35 and labels[(0, "p0", 0)].passed is True and labels[(0, "p0", 0)].agree
    assert len(labels) == 17


def _decision(passed=True):
    return PassDecision(passed=passed, value=75.0, target=70.0, statistic="mean", metric="precision", reason="precision mean 75.00 ≥ 70")


def test_require_kappa_blocks_a_pass_without_a_calibrated_judge(tmp_path):
    cal = Calibration(judges=[JudgeAgreement(judge="judge-a", kappa=0.58)])
    blocked = scoring.require_kappa(_decision(), cal, 0.6)
    assert not blocked.passed and "kappa 0.58 < 0.6" in blocked.reason and "judge.require_kappa" in blocked.reason
    assert scoring.require_kappa(_decision(), cal, 0.5).passed
    assert "no calibration" in scoring.require_kappa(_decision(), None, 0.5).reason
    # Through the loop's decision, reading the run's calibration.json.
    store = planted_run(tmp_path)
    scores = Scores.model_validate({"precision": {"n": 10, "mean": 75.0}})
    cfg = cfg_for(tmp_path, require_kappa=0.6)
    assert "no calibration" in loop.decide(cfg, scores, None, store).reason
    calibrate.calibrate(cfg, store)
    d = loop.decide(cfg, scores, None, store)
    assert not d.passed and "kappa 0.58 < 0.6" in d.reason
    assert loop.decide(cfg_for(tmp_path, require_kappa=0.5), scores, None, store).passed
