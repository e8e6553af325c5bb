"""The report's SVG charts, drawn from hand-built views: well-formed, and empty when there is nothing to draw."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from llamaduo.report.charts import data_stacks, svg_histogram, svg_rounds, svg_stacked
from llamaduo.report.views import ReportView, RoundView


def _view(values: list[float | None]) -> ReportView:
    rounds = [RoundView(label=f"r{i:02d}", round=i, value=v, passed=None if v is None else v >= 70) for i, v in enumerate(values)]
    return ReportView(name="t", target=70.0, rounds=rounds)


def test_rounds_chart_draws_measured_rounds_and_the_target():
    svg = svg_rounds(_view([52.75, None, 72.875]))
    ET.fromstring(svg)
    assert "target 70.0" in svg and ">52.8<" in svg and ">72.9<" in svg
    assert len(re.findall(r"<circle ", svg)) == 2  # the unmeasured round has no point
    assert ">r01<" in svg  # but keeps its place on the axis


def test_nothing_measured_draws_no_chart():
    assert svg_rounds(_view([None, None])) == ""
    assert svg_histogram(RoundView(label="r00")) == ""
    assert svg_stacked([], [], {}, str) == ""


def test_histogram_bins_candidate_means_in_tens():
    rv = RoundView(label="r00", candidate_scores={"precision": [5.0, 55.0, 58.0, 100.0]})
    svg = svg_histogram(rv)
    ET.fromstring(svg)
    assert "r00 · 4 candidates" in svg
    titles = re.findall(r"<title>(.*?)</title>", svg)
    assert titles == ["precision 0–10: 1", "precision 50–60: 2", "precision 90–100: 1"]  # 100 falls in the top bin


def test_stacked_bars_with_a_cumulative_line():
    svg = svg_stacked(["r00", "r01"], [{"judge": 0.04}, {"judge": 0.04, "synth": 0.05}], {"judge": "#1971c2"},
                      lambda v: f"${v:.2f}", cumulative=True, money=True)
    ET.fromstring(svg)
    assert "r01 synth: $0.05" in svg and ">$0.13<" in svg  # running total at r01
    assert "<polyline" in svg and ">cumulative<" in svg


def test_data_stacks_split_coverage_from_synthetic_pairs():
    view = ReportView(name="t", rounds=[
        RoundView(label="r00", round=0, train_examples=20, synthetic_added=0),
        RoundView(label="r01", round=1, train_examples=None),  # not trained yet: left out
        RoundView(label="r02", round=2, train_examples=50, synthetic_added=30),
    ])
    assert data_stacks(view) == (["r00", "r02"], [{"coverage": 20.0, "synthetic": 0.0}, {"coverage": 20.0, "synthetic": 30.0}])
