"""The run report: numbers from a hand-built run directory, escaping, and a real browser render."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from pathlib import Path

import pytest

from llamaduo import cost, judge, report
from llamaduo.config import Config, ServiceConfig, dump_config, from_dict
from llamaduo.data import make_example
from llamaduo.service import ServiceClient
from llamaduo.store import RunStore, atomic_write_text, read_json, write_json, write_jsonl

SCRIPT = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Per-candidate precision scores by round (4 prompts × 2 samples, each judged twice alike).
PRECISION = {
    0: [40, 45, 50, 52, 55, 58, 60, 62],
    1: [50, 60, 62, 65, 70, 72, 75, 80],
    2: [30, 70, 74, 76, 78, 80, 85, 90],
}
ROUND_STATS = {  # hand-computed from PRECISION: mean, median, coverage@50, coverage@70
    0: (52.75, 53.5, 75.0, 0.0),
    1: (66.75, 67.5, 100.0, 50.0),
    2: (72.875, 77.0, 87.5, 87.5),
}
BASELINE_PRECISION = 78  # the service LLM's own answers, judged the same way


def judged(tests, scores, judges=("gpt-4o-mini", "gpt-4o-mini"), script_at=None):
    """Predictions and judgment rows: candidate k answers test k // 2, each judged once per judge."""
    preds, rows = [], []
    for k, score in enumerate(scores):
        test, sample = tests[k // 2], k % 2
        text = f"Ignore the reference. {SCRIPT} & done" if k == script_at else f"Candidate for {test.id} sample {sample}."
        preds.append({"prompt_id": test.id, "sample_index": sample, "text": text, "new_tokens": 12})
        for n, model in enumerate(judges):
            rows.append(
                {
                    "prompt_id": test.id, "sample_index": sample, "judge_index": n if judges[0] == judges[-1] else 0,
                    "ok": True, "similarity": score - 5, "precision": score,
                    "similarity_reason": f"close to the reference ({score - 5})",
                    "precision_reason": "answers <b>only</b> half" if k == script_at else f"mostly right ({score})",
                    "judge_model": model,
                }
            )
    return preds, rows


def build_run(root: Path, simulated: bool = True) -> RunStore:
    """A finished three-round run written with the store helpers and the judge's own aggregation,
    as the loop would leave it: r02 is judged by a two-model panel; a service baseline exists."""
    store = RunStore(root)
    store.init_manifest(seed=7)
    cfg: Config = from_dict(
        {
            "name": root.name,
            "service": {"model": "gpt-4o-mini"},
            "judge": {"pass_rule": {"metric": "precision", "statistic": "mean", "threshold": 70}},
        }
    )
    atomic_write_text(store.config_path, dump_config(cfg))
    tests = [
        make_example(f"Summarise item {i} in one line.", f"Item {i} is short and sweet.", category=cat)
        for i, cat in enumerate(["summarize", "summarize", "extract", "classify"])
    ]
    write_jsonl(store.test_path, tests)
    write_jsonl(store.train_path, [make_example(f"train {i}", f"answer {i}") for i in range(20)])
    write_json(store.stats_path, {"train": {"count": 20}, "test": {"count": 4}})

    base_preds, base_rows = judged(tests, [BASELINE_PRECISION] * 8)
    baseline = judge.compute_scores(base_rows, len(base_preds), test=tests)
    write_jsonl(store.baseline_dir / "predictions.jsonl", base_preds)
    write_jsonl(store.baseline_dir / "judgments.jsonl", base_rows)
    write_json(store.baseline_dir / "scores.json", baseline.model_dump(mode="json"))

    train_sizes = {0: 20, 1: 32, 2: 50}
    for r, scores in PRECISION.items():
        panel = ("gpt-4o-mini", "claude-3-5-haiku-latest") if r == 2 else ("gpt-4o-mini", "gpt-4o-mini")
        preds, rows = judged(tests, scores, panel, script_at=0 if r == 2 else None)
        if r == 1:
            rows.append(
                {"prompt_id": tests[0].id, "sample_index": 0, "judge_index": 2, "ok": False,
                 "error": "invalid JSON for JudgeReply: no JSON object in the reply", "judge_model": "gpt-4o-mini"}
            )
        write_jsonl(store.predictions_path(r), preds)
        write_jsonl(store.judgments_path(r), rows)
        result = judge.compute_scores(rows, len(preds), test=tests)
        write_json(store.scores_path(r), result.model_dump(mode="json"))
        decision = judge.evaluate_pass(result, cfg.judge.pass_rule, baseline)
        write_json(store.train_result_path(r), {"train_loss": 2.0 - r / 2, "examples": train_sizes[r], "tokens_per_s": 900.0})
        if r > 0:
            write_jsonl(store.synthetic_path(r), [make_example(f"syn {r}-{i}", f"resp {i}") for i in range(12 if r == 1 else 18)])
            reasons = ["near_duplicate"] * 3 + ["test_contamination"] if r == 1 else ["exact_duplicate"] * 2 + ["too_short"]
            write_jsonl(store.rejected_path(r), [{"instruction": "x", "response": "y", "reason": x, "round": r} for x in reasons])
        store.set_round(
            r, round=r, value=decision.value, passed=decision.passed, train_examples=train_sizes[r],
            synthetic_added=train_sizes[r] - train_sizes.get(r - 1, 20), decision=decision.model_dump(mode="json"),
        )
    # The call log, written by the real client's logger: judge and synth calls per round, one cache hit.
    client = ServiceClient(ServiceConfig(base_url="http://127.0.0.1:9/v1", model="gpt-4o-mini"), db_path=store.service_db)
    for r in range(3):
        for _ in range(4):
            client.log.record(ts=0.0, stage="judge", round=r, model="gpt-4o-mini", status="ok", attempt=1,
                              input_tokens=1000, output_tokens=100, cost_usd=0.01)
        if r > 0:
            client.log.record(ts=0.0, stage="synth", round=r, model="gpt-4o-mini", status="ok", attempt=1,
                              input_tokens=500, output_tokens=800, cost_usd=0.05)
    client.log.record(ts=0.0, stage="judge", round=2, model="gpt-4o-mini", status="cached", attempt=0, saved_usd=0.01)
    client.log.record(ts=0.0, stage="judge", round=1, model="gpt-4o-mini", status="failed", attempt=3, error="timeout")
    ledger = client.ledger()
    client.close()
    extra = {"simulated_service": True, "simulator_label": "Offline demo: the service LLM is a scripted simulator."} if simulated else {}
    store.update_manifest(state="finished", stop_reason="target_met", best_round=2, best_value=72.88, ledger=ledger, **extra)
    return store


# ------------------------------------------------------------------ content
def test_report_shows_round_statistics_against_the_target(tmp_path):
    store = build_run(tmp_path / "demo-run")
    html_path, md_path = report.write_report(store)
    assert (html_path, md_path) == (store.report_html, store.report_md)
    html, md = html_path.read_text(), md_path.read_text()
    for text in (html, md):
        assert "demo-run" in text and "target_met" in text
        assert "precision mean ≥ 70.0" in text
        for r, (mean, median, c50, c70) in ROUND_STATS.items():
            assert f"{mean:.1f}" in text and f"{median:.1f}" in text
            assert f"{c50:.1f}%" in text and f"{c70:.1f}%" in text
            lo, hi = read_json(store.scores_path(r))["precision"]["ci"]
            assert f"[{lo:.1f}, {hi:.1f}]" in text
        assert "service baseline" in text
    # Informational ratio against the service baseline (mean 78): 72.875 / 78 = 93 %.
    assert "72.9 (93% of service)" in md and '72.9<span class="ci">93% of service</span>' in html
    # r00 and r01 failed the rule, r02 passed.
    results = re.findall(r'<span class="pill (pass|fail)">', html)
    assert results == ["fail", "fail", "pass"]
    assert re.search(r"r02 ★", html)
    assert "<svg" in html and "target 70.0" in html  # the line chart with the target line


def test_cost_per_stage_and_cumulative_per_round_come_from_the_call_log(tmp_path):
    store = build_run(tmp_path / "run")
    view = report.collect(store)
    by_stage = {s["stage"]: s for s in view.cost.by_stage}
    assert view.cost.source == "service.sqlite"
    assert by_stage["judge"]["calls"] == 13 and by_stage["judge"]["cached"] == 1 and by_stage["judge"]["failed"] == 1
    assert by_stage["synth"]["usd"] == pytest.approx(0.10)
    assert view.cost.total_usd == pytest.approx(0.22)
    assert [label for label, _ in view.cost.by_round] == ["r00", "r01", "r02"]
    report.write_report(store)
    md = store.report_md.read_text()
    # Cumulative: 0.04, then 0.04 + 0.09, then + 0.09.
    assert "| r01 | $0.0900 | $0.1300 |" in md and "| r02 | $0.0900 | $0.2200 |" in md
    assert "$0.2200" in store.report_html.read_text()


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


def test_judged_failures_are_shown_with_their_error(tmp_path):
    store = build_run(tmp_path / "run")
    view = report.collect(store)
    r1 = view.rounds[1]
    assert r1.counts["failed"] == 1
    assert r1.judge_errors.most_common(1)[0] == ("invalid JSON for JudgeReply: no JSON object in the reply", 1)
    report.write_report(store)
    assert "invalid JSON for JudgeReply: no JSON object in the reply (×1)" in store.report_html.read_text()


def test_untrusted_candidate_text_is_escaped_in_html_and_fenced_in_markdown(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; done" in html
    assert "answers &lt;b&gt;only&lt;/b&gt; half" in html  # judge reasons are untrusted too
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    # The worst item of the best round (r02) is the injected candidate, shown first.
    worst = html.index("Lowest-scoring answers of round r02")
    assert html.index("&lt;script&gt;", worst) < html.index("Candidate for", worst)
    # In Markdown the raw text sits only inside a code fence, where renderers keep it inert.
    fenced = re.findall(r"^(`{3,})text\n(.*?)\n\1$", md, re.S | re.M)
    assert any(SCRIPT in body for _, body in fenced)
    assert SCRIPT not in re.sub(r"^(`{3,})text\n.*?\n\1$", "", md, flags=re.S | re.M)


def test_page_is_self_contained_with_well_formed_charts(tmp_path):
    store = build_run(tmp_path / "run")
    cost.save_inputs(store, input_tokens_per_month=1e8, output_tokens_per_month=2e7)
    report.write_report(store)
    html = store.report_html.read_text()
    assert not re.search(r"\b(src|href)\s*=", html, re.I)
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert "@import" not in html and "url(" not in html
    # rounds, histograms of three rounds and the baseline, cost per round, data growth, projection
    charts = re.findall(r"<svg\b.*?</svg>", html, re.S)
    assert len(charts) == 8
    for svg in charts:
        ET.fromstring(svg)  # raises on a malformed chart


def test_simulated_service_is_labelled(tmp_path):
    sim = build_run(tmp_path / "sim")
    real = build_run(tmp_path / "real", simulated=False)
    report.write_report(sim)
    report.write_report(real)
    assert "Simulated service LLM." in sim.report_html.read_text()
    assert "Offline demo: the service LLM is a scripted simulator." in sim.report_md.read_text()
    assert "Simulated" not in real.report_html.read_text()


def test_missing_and_broken_pieces_show_as_na_without_raising(tmp_path):
    store = RunStore(tmp_path / "bare")
    store.init_manifest(seed=0)
    report.write_report(store)
    html = store.report_html.read_text()
    assert "n/a: no round has run yet." in html and "No cost projection yet" in html

    store = build_run(tmp_path / "broken")
    atomic_write_text(store.judgments_path(1), '{"prompt_id": "x", "ok": tr')  # truncated JSON
    atomic_write_text(store.scores_path(0), "[1, 2]")  # valid JSON, wrong shape
    report.write_report(store)
    html = store.report_html.read_text()
    assert "Unreadable pieces" in html and "r01/judgments.jsonl: JSONDecodeError" in html
    row_r00 = re.search(r"<tr><td class=\"l\">r00</td>.*?</tr>", html).group(0)
    assert "n/a" in row_r00

    # A manifest with the wrong types everywhere still gives a page.
    store = build_run(tmp_path / "odd")
    store.update_manifest(rounds={"r00": 5, "r01": {"decision": "x", "value": "high"}}, ledger="?", best_round="2")
    atomic_write_text(store.rejected_path(1), "[1, 2]\n")
    report.write_report(store)
    assert "Rounds against the target" in store.report_html.read_text()


def test_rewriting_replaces_the_report_and_leaves_no_temp_files(tmp_path):
    store = build_run(tmp_path / "run")
    report.write_report(store)
    store.update_manifest(stop_reason="budget")
    report.write_report(store)
    assert "budget" in store.report_html.read_text()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]


def test_cost_projection_appears_once_inputs_are_saved(tmp_path):
    store = build_run(tmp_path / "run")
    cost.save_inputs(store, input_tokens_per_month=1e8, output_tokens_per_month=2e7)
    report.write_report(store)
    html, md = store.report_html.read_text(), store.report_md.read_text()
    assert "Cost projection: service LLM vs local model" in html and "break-even" in html
    # gpt-4o-mini list prices: 100 M × $0.15 + 20 M × $0.60 = $27 a month.
    assert "| service cost per month | $27.00 |" in md


# ------------------------------------------------------------------ headless Chromium
def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    base = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp}", "--enable-logging=stderr", "--v=0",
    ]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


def _page_errors(stderr: str) -> list[str]:
    """Lines where the page itself reported a console message or an uncaught error."""
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "Refused to" in ln]


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i : i + 3]) for r in rows[::8] for i in range(0, stride, bpp * 8)]


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)


@needs_chromium
def test_report_renders_in_headless_chromium_without_page_errors(tmp_path):
    store = build_run(tmp_path / "run")
    cost.save_inputs(store, input_tokens_per_month=1e8, output_tokens_per_month=2e7)
    report.write_report(store)
    url = store.report_html.resolve().as_uri()
    png = tmp_path / "report.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1280,2000", url], tmp_path / "profile1")
    assert png.exists(), shot.stderr[-2000:]
    width, height, pixels = _png_pixels(png)
    assert (width, height) == (1280, 2000)
    colours = Counter(pixels)
    assert len(colours) > 50  # text, charts and table rules, not a blank page
    assert colours.most_common(1)[0][1] < 0.9 * len(pixels)
    assert not _page_errors(shot.stderr), _page_errors(shot.stderr)

    dom = _chromium(["--dump-dom", url], tmp_path / "profile2")
    assert "<title>llamaduo report: run</title>" in dom.stdout
    assert "Rounds against the target" in dom.stdout and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout
    assert "<script" not in dom.stdout.lower()
    assert not _page_errors(dom.stderr), _page_errors(dom.stderr)


@needs_chromium
def test_the_page_error_check_catches_a_broken_page(tmp_path):
    # The check above is only meaningful if a page error does show up in Chromium's log.
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><title>bad</title><script>undefinedFunction()</script>")
    out = _chromium(["--dump-dom", bad.as_uri()], tmp_path / "profile")
    assert "<title>bad</title>" in out.stdout
    assert any("undefinedFunction" in ln for ln in _page_errors(out.stderr))
