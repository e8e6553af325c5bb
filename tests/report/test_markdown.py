"""report.md: the same numbers as the page, as tables a person reads in a terminal or a pull request."""

from __future__ import annotations

from llamaduo import report
from tests.report.conftest import build_run


def test_data_growth_and_rejections_by_reason_are_counted(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    md = store.report_md.read_text()
    assert "| round | train examples | synthetic kept | rejected | exact_duplicate | near_duplicate | test_contamination | too_short |" in md
    assert "| r01 | 32 | 12 | 4 | 0 | 3 | 1 | 0 |" in md
    assert "| r02 | 50 | 18 | 3 | 2 | 0 | 0 | 1 |" in md
    assert "Coverage split: 20 train, 4 test." in store.report_html.read_text()


def test_judge_panel_agreement_is_reported(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    md = store.report_md.read_text()
    # r02 was judged by two models that agree exactly.
    assert "| r02 | claude-3-5-haiku-latest vs gpt-4o-mini | precision | 8 | 1.00 | 0.0 |" in md
    assert "judge: claude-3-5-haiku-latest, gpt-4o-mini" in md


def test_untrusted_text_cannot_break_a_table_or_a_fence():
    from llamaduo.report.views import ReportView, RoundView, WorstItem

    tricky = "a | b\n```\n<img src=x>"
    view = ReportView(
        name="x|y",
        rounds=[RoundView(label="r00", round=0)],
        worst_round=0,
        worst=[WorstItem("p|1", 0, "cat", tricky, "ref", "````inner", {"precision": 10.0}, [tricky])],
    )
    md = report.render_markdown(view)
    assert "# Migration report: x\\|y" in md
    assert "### p\\|1 (sample 0, cat): precision 10.0" in md
    assert "`````text\n````inner\n`````" in md  # the fence outgrows the longest backtick run inside
    assert "- a \\| b ``` &lt;img src=x&gt;" in md  # a reason is one escaped line
    assert "| r00 | n/a | n/a | " in md  # never run: nothing measured


def test_a_structured_runs_exact_metrics_show_per_round_and_its_worst_items_name_the_failure(tmp_path):
    from llamaduo import exact, scoring
    from llamaduo.artifacts import RoundRecord
    from llamaduo.config import dump_config, from_dict
    from llamaduo.data import Example, Message
    from llamaduo.files import atomic_write_text, write_jsonl
    from tests.report.conftest import judged, start_run, train_result

    store, _, _ = start_run(tmp_path / "run")
    cfg = from_dict({"name": "run", "judge": {"pass_rule": {"metric": "schema_valid", "threshold": 0.99,
                                                            "also": [{"metric": "precision", "threshold": 60}]}}})
    atomic_write_text(store.config_path, dump_config(cfg))
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    tests = [Example(id=f"s{i}", response_format=fmt, messages=[
        Message(role="user", content=f"Where is item {i}?"), Message(role="assistant", content='{"city": "Leeds"}')])
        for i in range(4)]
    write_jsonl(store.test_path, tests)
    preds, rows = judged(tests, [40, 45, 50, 52, 55, 58, 60, 62])
    for p in preds:  # every answer valid JSON of the schema but one; one city wrong
        p.text = '{"city": "Leeds"}'
    preds[0].text, preds[1].text = '{"city": ', '{"city": "Lyon"}'
    store.write_predictions(0, preds)
    store.write_judgments(0, rows)
    scores = scoring.compute_scores(rows, len(preds), test=tests)
    scores.exact = exact.exact_stats(preds, tests)
    store.write_scores(0, scores)
    store.write_train_result(0, train_result(store, 0))
    decision = scoring.evaluate_pass(scores, cfg.judge.pass_rule)
    store.set_round(RoundRecord(round=0, value=decision.value, passed=decision.passed, train_examples=20, decision=decision))
    report.write_report(store)
    md = store.report_md.read_text()
    assert "- pass rule: schema_valid mean ≥ 0.99 and precision mean ≥ 60" in md
    assert "| round | json_valid | schema_valid | tool_name_match | arguments_exact | field_accuracy |" in md
    assert "| r00 | 0.88 [0.62, 1.00] | 0.88 [0.62, 1.00] | n/a | n/a | 0.75 [0.25, 1.00] |" in md
    assert "| 0.88 | fail |" in md  # the pass statistic is a rate: two decimals
    assert "**exact check failed:** not JSON" in md and "**exact check failed:** field city: 'Lyon' instead of 'Leeds'" in md
    html = store.report_html.read_text()
    assert "<section id='exact'>" in html and "exact check failed:</b> not JSON" in html


def test_a_free_text_run_has_no_exact_metrics_section(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    assert "Exact metrics" not in store.report_md.read_text()
    assert "id='exact'" not in store.report_html.read_text()


def test_a_rejected_shipped_artifact_and_what_passes_instead_are_in_both_reports(tmp_path):
    from llamaduo.artifacts import Parity, ParityRow
    from llamaduo.files import write_json

    store = build_run(tmp_path / "run")
    parity = Parity(round=2, metric="precision", statistic="mean", round_value=88.0, max_drop=2.0, shipped="q4_k_m",
                    shipped_rejected=True, passes_instead=["q8_0"], rows=[
                        ParityRow(artifact="merged", runtime="llamaduo serve", value=88.0, ci=(85.0, 91.0),
                                  difference=0.0, difference_ci=(0.0, 0.0), identical=1.0, tokens_per_s=9.9,
                                  peak_rss_mb=900, prompts=4, rejected=False),
                        ParityRow(artifact="q8_0", runtime="llama.cpp", value=87.5, difference=-0.5,
                                  difference_ci=(-1.5, 0.5), identical=0.95, tokens_per_s=40.0, prompts=4, rejected=False),
                        ParityRow(artifact="q4_k_m", runtime="llama.cpp", value=70.0, difference=-18.0,
                                  difference_ci=(-25.0, -11.0), identical=0.25, tokens_per_s=55.0, prompts=4, rejected=True),
                        ParityRow(artifact="f16", runtime="llama.cpp", error="llama.cpp did not start"),
                    ])
    write_json(store.parity_path, parity.model_dump(mode="json", exclude_none=True))
    report.write_report(store)
    md, html = store.report_md.read_text(), store.report_html.read_text()
    verdict = "The shipped artifact (q4_k_m) is REJECTED"
    assert verdict in md and verdict in html and "Passes instead: q8_0." in md and "Passes instead: q8_0." in html
    assert "| q4_k_m (shipped) | llama.cpp | 70.0 | n/a | -18.0 | [-25.0, -11.0] | 25% | 55.0 | n/a | rejected |" in md
    assert "| f16 | llama.cpp | n/a | n/a | n/a | n/a | n/a | n/a | n/a | not measured: llama.cpp did not start |" in md
    assert "id='shipping'" in html


def test_a_run_never_deployed_has_no_shipping_section(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    assert "Shipping" not in store.report_md.read_text() and "id='shipping'" not in store.report_html.read_text()
