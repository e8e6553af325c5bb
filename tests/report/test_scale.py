"""The report at the paper's volume: counts of every synthetic and rejected row, only a sample shown."""

from __future__ import annotations

import resource
import time

from llamaduo import report
from llamaduo.data import Lineage, make_example
from llamaduo.report.views import SAMPLE_N
from tests.report.conftest import build_run
from tests.report.test_html import _chromium, _page_errors, needs_chromium

KEPT, REJECTED = 20_000, {"near_duplicate": 15_000, "test_contamination": 8_000, "exact_duplicate": 2_000}


def big_round(tmp_path):
    """The finished demo run, with round 2 holding tens of thousands of kept and rejected pairs."""
    store = build_run(tmp_path / "run")
    lineage = Lineage(source="synthetic", round=2, seed_id="ex-seed")
    store.write_synthetic(2, (make_example(f"Kept instruction {i} " + "word " * 40, f"Kept response {i} " + "more " * 60,
                                           lineage=lineage) for i in range(KEPT)))
    store.write_rejected(2, ({"instruction": f"Rejected {reason} {i} " + "word " * 40, "response": "text " * 60,
                              "reason": reason, "duplicate_of": f"ex-{i}", "detail": "ROUGE-L F1 0.93", "round": 2}
                             for reason, n in REJECTED.items() for i in range(n)))
    return store


def test_a_report_over_many_thousands_of_synthetic_rows_stays_small_and_says_what_it_samples(tmp_path):
    store = big_round(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    html_path, md_path = report.write_report(store)
    seconds = time.perf_counter() - t0
    html, md = html_path.read_text(), md_path.read_text()

    assert html_path.stat().st_size < 200_000 and md_path.stat().st_size < 100_000  # a page, not a data dump
    for text in (html, md):
        assert f"{SAMPLE_N} of {KEPT:,} kept pairs shown" in text
        for reason, n in REJECTED.items():
            assert f"{SAMPLE_N} of {n:,} rejected as {reason} shown" in text
    # The counts cover every row, the page holds only the sample's texts.
    assert f">{sum(REJECTED.values())}<" in html and ">15000<" in html  # rejected in all, and as near duplicates
    assert sum(html.count(f"Kept instruction {i} ") for i in range(KEPT)) == SAMPLE_N
    assert "more characters]" in html  # long sampled texts are cut
    # Streamed: reading 45,000 rows neither holds them (the peak grows by well under their size) nor takes long.
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50 and seconds < 60


def test_the_sample_is_the_same_every_time_the_report_is_written(tmp_path):
    store = big_round(tmp_path)
    first = report.write_report(store)[0].read_text()
    second = report.write_report(store)[0].read_text()
    strip = lambda page: page.split("updated")[0]  # noqa: E731
    assert strip(first) == strip(second)


def test_rounds_with_few_rows_show_them_all_with_their_counts(tmp_path):
    store = build_run(tmp_path / "run")
    html = report.write_report(store)[0].read_text()
    assert f"{SAMPLE_N} of 12 kept pairs shown" in html  # r01 has 12 kept pairs in the demo run
    assert "1 of 1 rejected as test_contamination shown" in html


@needs_chromium
def test_the_report_at_that_scale_opens_in_headless_chromium_quickly(tmp_path):
    store = big_round(tmp_path)
    report.write_report(store)
    t0 = time.perf_counter()
    dom = _chromium(["--dump-dom", store.report_html.resolve().as_uri()], tmp_path / "profile")
    seconds = time.perf_counter() - t0
    assert f"{SAMPLE_N} of {KEPT:,} kept pairs shown" in dom.stdout
    assert not _page_errors(dom.stderr), _page_errors(dom.stderr)
    assert seconds < 30  # Chromium's own start included; the page itself is a few hundred KB at most
