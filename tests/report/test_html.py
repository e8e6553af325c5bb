"""report.html: round statistics, escaping of untrusted text, a self-contained page, a real browser render."""

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

from llamaduo import cost, report
from tests.report.conftest import ROUND_STATS, SCRIPT, build_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
            lo, hi = store.read_scores(r).precision.ci
            assert f"[{lo:.1f}, {hi:.1f}]" in text
        assert "service baseline" in text
    # Informational ratio against the service baseline (mean 78): 72.875 / 78 = 93 %.
    assert "72.9 (93% of service)" in md and '72.9<span class="ci">93% of service</span>' in html
    # r00 and r01 failed the rule, r02 passed.
    results = re.findall(r'<span class="pill (pass|fail)">', html)
    assert results == ["fail", "fail", "pass"]
    assert re.search(r"r02 ★", html)
    assert "<svg" in html and "target 70.0" in html  # the line chart with the target line


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
