"""collect: the view read from a run directory's typed artifacts, and what a broken piece does to it."""

from __future__ import annotations

import json
import re

import pytest

from llamaduo import report, scoring
from llamaduo.artifacts import Counts, Judgment, RoundRecord, Scores
from llamaduo.files import atomic_write_text
from llamaduo.store import RunStore
from tests.report.conftest import build_run, judged, start_run, train_result


def test_cost_per_stage_and_cumulative_per_round_come_from_the_call_log(tmp_path):
    store = build_run(tmp_path / "run")
    view = report.collect(store)
    by_stage = view.cost.by_stage
    assert view.cost.source == "service.sqlite"
    assert by_stage["judge"].calls == 13 and by_stage["judge"].cached == 1 and by_stage["judge"].failed == 1
    assert by_stage["synth"].usd == pytest.approx(0.10)
    assert view.cost.total_usd == pytest.approx(0.22)
    assert [label for label, _ in view.cost.by_round] == ["r00", "r01", "r02"]
    report.write_report(store)
    md = store.report_md.read_text()
    # Cumulative: 0.04, then 0.04 + 0.09, then + 0.09.
    assert "| r01 | $0.0900 | $0.1300 |" in md and "| r02 | $0.0900 | $0.2200 |" in md
    assert "$0.2200" in store.report_html.read_text()


def test_cost_falls_back_to_the_manifest_ledger_without_a_call_log(tmp_path):
    store = build_run(tmp_path / "run")
    store.service_db.unlink()
    view = report.collect(store)
    assert view.cost.source == "manifest ledger"
    assert view.cost.by_stage["judge"].calls == 13 and view.cost.total_usd == pytest.approx(0.22)


def test_judged_failures_are_shown_with_their_error(tmp_path):
    store = build_run(tmp_path / "run")
    view = report.collect(store)
    r1 = view.rounds[1]
    assert r1.counts is not None and r1.counts.failed == 1
    assert r1.judge_errors.most_common(1)[0] == ("invalid JSON for JudgeReply: no JSON object in the reply", 1)
    report.write_report(store)
    assert "invalid JSON for JudgeReply: no JSON object in the reply (×1)" in store.report_html.read_text()


def test_a_round_with_no_judged_candidate_shows_na_not_zero(tmp_path):
    store, cfg, tests = start_run(tmp_path / "unjudged")
    preds, _ = judged(tests, [50] * 8)
    failed = [Judgment(prompt_id=p.prompt_id, sample_index=p.sample_index, judge_index=0, ok=False, error="timeout")
              for p in preds]
    store.write_predictions(0, preds)
    store.write_judgments(0, failed)
    scores = scoring.compute_scores(failed, len(preds), test=tests)
    assert scores.precision.mean is None and scores.similarity.median is None  # nothing was measured
    store.write_scores(0, scores)
    store.write_train_result(0, train_result(store, 0))
    # As the loop records it: the pass decision carries a 0.0 placeholder for the undefined statistic.
    decision = scoring.evaluate_pass(scores, cfg.judge.pass_rule)
    store.set_round(RoundRecord(round=0, value=decision.value, passed=False, train_examples=20, decision=decision))
    store.update_manifest(state="finished", best_round=0, best_value=decision.value)

    view = report.collect(store)
    assert view.rounds[0].value is None and view.best_value is None
    report.write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    row = re.search(r'<tr><td class="l">r00 ★</td>.*?</tr>', html).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[3:] == ["n/a"] * 8 + ["n/a", '<span class="pill fail">fail</span>']
    assert "0.0" not in row
    md_row = next(line for line in md.splitlines() if line.startswith("| r00 |"))
    assert md_row == "| r00 | 20 | 0 | " + "n/a | " * 9 + "fail |"
    assert "precision mean n/a" in md and "0.0" not in md_row
    # The counts were measured: eight candidates, none judged, eight failed judgments.
    assert "| r00 | 8 | 0 | 8 | 0 | 0 | 8 | 8 | timeout (×8) |" in md


def test_empty_scores_model_reads_as_na(tmp_path):
    # The bare model, as a round that judged nothing would write it.
    store, _, _ = start_run(tmp_path / "bare-scores")
    store.write_scores(0, Scores(counts=Counts(candidates=4, missing=4)))
    report.write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    row = re.search(r'<tr><td class="l">r00</td>.*?</tr>', html).group(0)
    assert "n/a" in row and "0.0" not in row
    md_row = next(line for line in md.splitlines() if line.startswith("| r00 |"))
    assert "n/a" in md_row and "0.0" not in md_row


def test_missing_and_broken_pieces_show_as_na_without_raising(tmp_path):
    store = RunStore(tmp_path / "bare")
    store.init_manifest(seed=0)
    report.write_report(store)
    html = store.report_html.read_text()
    assert "n/a: no round has run yet." in html and "No cost projection yet" in html
    assert "Unreadable pieces" not in html  # nothing written yet is not a problem

    store = build_run(tmp_path / "broken")
    atomic_write_text(store.judgments_path(1), '{"prompt_id": "x", "ok": tr')  # truncated JSON
    atomic_write_text(store.scores_path(0), "[1, 2]")  # valid JSON, wrong shape
    report.write_report(store)
    html = store.report_html.read_text()
    assert "Unreadable pieces" in html and "rounds/r01/judgments.jsonl:1: Invalid JSON" in html
    assert "rounds/r00/scores.json: " in html
    row_r00 = re.search(r"<tr><td class=\"l\">r00</td>.*?</tr>", html).group(0)
    assert "n/a" in row_r00
    row_r02 = re.search(r"<tr><td class=\"l\">r02 ★</td>.*?</tr>", html).group(0)
    assert "72.9" in row_r02  # the other rounds are untouched

    # A manifest with the wrong types everywhere still gives a page, rounds read from their files.
    store = build_run(tmp_path / "odd")
    tree = json.loads(store.manifest_path.read_text())
    tree.update(rounds={"r00": 5, "r01": {"decision": "x", "value": "high"}}, ledger="?", best_round="2")
    atomic_write_text(store.manifest_path, json.dumps(tree))
    atomic_write_text(store.rejected_path(1), "[1, 2]\n")
    report.write_report(store)
    html = store.report_html.read_text()
    assert "Rounds against the target" in html and "manifest.json: field" in html
    assert "rounds/r01/rejected.jsonl:1: " in html
    assert re.search(r'<tr><td class="l">r02</td>', html)
    assert html.count("manifest.json: field") == 1  # noted once, though the cost reader meets it too


def test_rewriting_replaces_the_report_and_leaves_no_temp_files(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    store.update_manifest(stop_reason="budget")
    report.write_report(store)
    assert "budget" in store.report_html.read_text()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]
