"""The report's judge card (agreement with people, bias probes, their cost) and the marker on
candidates the token limit cut off."""

from __future__ import annotations

from llamaduo import report, scoring
from llamaduo.artifacts import Calibration, Completion, JudgeAgreement, LedgerRow, ProbeResult
from tests.report.conftest import SCRIPT, build_run


def test_an_uncalibrated_run_says_so_in_the_judge_card(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    assert "<section id='judge-card'><h2>Judge card</h2><p class='note'>n/a: the judge is not calibrated" in store.report_html.read_text()
    assert "## Judge card\n\nn/a: the judge is not calibrated" in store.report_md.read_text()


def test_the_judge_card_shows_agreement_probes_and_their_cost(tmp_path):
    store = build_run(tmp_path / "run")
    store.write_calibration(Calibration(
        at="2025-01-01T00:00:00Z", labels=12, matched=11, unmatched=1, threshold=70,
        judges=[JudgeAgreement(judge="gpt-4o-mini", scored=11, spearman=0.8123, spearman_ci=[0.61, 0.93],
                               classified=11, kappa=0.58, kappa_ci=None, agreement=0.82)],
        probes=[ProbeResult(probe="padded", judge=SCRIPT, items=4, similarity=90.0, precision=95.5, value=12.5,
                            check="precision gain over reference ≤ 5", passed=False),
                ProbeResult(probe="empty", judge="gpt-4o-mini", items=0, failed=8, check="precision mean ≤ 20")],
        probe_items=4, cost=LedgerRow(calls=56, usd=0.0123),
    ))
    report.write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    card = html[html.index("id='judge-card'"):html.index("id='worst'")]
    assert "11 of 12 people&#x27;s labels matched" in card and "$0.0123 (56 calls" in card
    assert "<td class=\"\">0.81</td><td class=\"\">[0.61, 0.93]</td>" in card and "<td class=\"\">0.58</td>" in card
    assert '<span class="pill fail">fail</span>' in card and '<span class="pill na">n/a</span>' in card
    assert SCRIPT not in html and "&lt;script&gt;" in card  # a judge name is untrusted text too
    assert "| padded | &lt;script&gt;alert(1)&lt;/script&gt; | 4 | 90.0 | 95.5 | precision gain over reference ≤ 5 | 12.5 | FAIL |" in md
    assert "| empty | gpt-4o-mini | 0 | n/a | n/a | precision mean ≤ 20 | n/a | n/a |" in md
    assert "| gpt-4o-mini | 11 | 0.81 | [0.61, 0.93] | 11 | 0.58 | n/a | 82% |" in md


def test_candidates_cut_by_the_token_limit_are_marked_in_worst_items_and_counted(tmp_path):
    store = build_run(tmp_path / "run")
    preds = store.read_predictions(2)  # preds[0] is r02's lowest-scoring candidate (precision 30)
    preds[0] = Completion(**{**preds[0].model_dump(), "finish_reason": "length"})
    store.write_predictions(2, preds)
    rows = store.read_judgments(2)
    duplicates, cut = scoring.candidate_facts(preds)
    store.write_scores(2, scoring.compute_scores(rows, len(preds), duplicates=duplicates, length_cut=cut))
    view = report.collect(store)
    assert [it.length_cut for it in view.worst].count(True) == 1 and view.worst[0].length_cut  # r02's lowest is k = 0
    report.write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    assert html.count("<span class='pill fail'>cut by the token limit</span>") == 1
    assert "(sample 0, summarize): similarity 25.0, precision 30.0 — **cut by the token limit**" in md
    assert "| round | candidates | judged | unjudged | not sent | cut by the token limit |" in md
    assert "| r02 | 8 | 8 | 0 | 0 | 1 |" in md
