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
