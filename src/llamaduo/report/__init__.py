"""The run report: `report.html` (self-contained, inline CSS and SVG) and `report.md`.

    html_path, md_path = write_report(RunStore("runs/demo"))

`collect` reads the run directory's typed artifacts into a `ReportView` (`views`); `html`
and `markdown` render that view, the HTML with the SVG charts of `charts`. Imports go one
way: views ← charts ← html, markdown; collect → views; this module → collect, html, markdown.
"""

from __future__ import annotations

from pathlib import Path

from llamaduo.files import atomic_write_text
from llamaduo.report.collect import collect
from llamaduo.report.html import render_html
from llamaduo.report.markdown import render_markdown
from llamaduo.report.views import ReportView
from llamaduo.store import RunStore

__all__ = ["ReportView", "collect", "render_html", "render_markdown", "write_report"]


def write_report(store: RunStore) -> tuple[Path, Path]:
    """Write report.html and report.md of a run directory atomically; returns both paths."""
    view = collect(store)
    atomic_write_text(store.report_html, render_html(view))
    atomic_write_text(store.report_md, render_markdown(view))
    return store.report_html, store.report_md
