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
