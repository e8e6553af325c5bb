"""SVG charts of the run report: rounds, score histograms, stacked bars (inline, no scripts)."""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from llamaduo import cost as cost_mod
from llamaduo.artifacts import EXACT_METRICS, METRICS
from llamaduo.report.views import METRIC_COLORS, OTHER_COLOR, ReportView, RoundView, fmt

_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, DejaVu Sans, sans-serif"'


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
        f'style="max-width:{width}px" role="img" aria-label="{escape(label)}" {_FONT} font-size="12">'
    )


def _text(x: float, y: float, s: str, anchor: str = "middle", fill: str = "#495057", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}" {extra}>{escape(s)}</text>'


def svg_rounds(view: ReportView, width: int = 1060, height: int = 280) -> str:
    """The pass statistic per round as a line, the target as a dashed line."""
    pts = [(rv.label, rv.value, rv.passed) for rv in view.rounds]
    if not any(v is not None for _, v, _ in pts):
        return ""
    left, right, top, bottom = 56, 24, 30, 40
    w, h = width - left - right, height - top - bottom
    hi = max([v for _, v, _ in pts if v is not None] + ([view.target] if view.target is not None else []))
    rate = view.metric in EXACT_METRICS  # a share 0-1, not a score 1-100
    ymax, step = (1.0, 0.25) if rate else (100.0, 25.0) if hi <= 100 else cost_mod.nice_axis(hi * 1.05)
    n = len(pts)

    def x(i: int) -> float:
        return left + (w * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + h * (1 - v / ymax)

    out = [_svg_open(width, height, f"{view.metric} {view.statistic} per round against the target")]
    for k in range(round(ymax / step) + 1):
        v = step * k
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e9ecef"/>')
        out.append(_text(left - 8, y(v) + 4, f"{v:g}", "end"))
    if view.target is not None:
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y(view.target):.1f}" y2="{y(view.target):.1f}" '
            'stroke="#c92a2a" stroke-width="1.5" stroke-dasharray="6 4"/>'
        )
        out.append(_text(left + w, y(view.target) - 6, f"target {fmt(view.target, 2 if rate else 1)}", "end", "#c92a2a"))
    line = [(x(i), y(v)) for i, (_, v, _) in enumerate(pts) if v is not None]
    out.append(
        '<polyline fill="none" stroke="#1864ab" stroke-width="2.5" points="'
        + " ".join(f"{a:.1f},{b:.1f}" for a, b in line)
        + '"/>'
    )
    for i, (label, v, passed) in enumerate(pts):
        out.append(_text(x(i), top + h + 20, label))
        if v is None:
            continue
        color = "#2b8a3e" if passed else ("#c92a2a" if passed is False else "#868e96")
        out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="5" fill="{color}" stroke="#fff" stroke-width="1.5"/>')
        out.append(_text(x(i), y(v) - 10, fmt(v, 2 if rate else 1), fill="#212529", extra='font-weight="600"'))
    out.append("</svg>")
    return "".join(out)


def svg_histogram(rv: RoundView, width: int = 360, height: int = 190) -> str:
    """Per-candidate mean scores of one round in ten bins, one bar per metric."""
    metrics = [mt for mt in METRICS if rv.candidate_scores.get(mt)]
    if not metrics:
        return ""
    left, right, top, bottom = 34, 10, 26, 34
    w, h = width - left - right, height - top - bottom
    counts = {mt: [0] * 10 for mt in metrics}
    for mt in metrics:
        for s in rv.candidate_scores[mt]:
            counts[mt][min(9, max(0, int(s // 10)))] += 1
    cmax = max(max(c) for c in counts.values()) or 1
    bw = w / 10
    n = len(rv.candidate_scores[metrics[0]])
    out = [_svg_open(width, height, f"score distribution of {rv.label}")]
    out.append(_text(left, 14, f"{rv.label} · {n} candidates", "start", "#212529", 'font-weight="600"'))
    for i, (mt, color) in enumerate((mt, METRIC_COLORS[mt]) for mt in metrics):
        lx = width - right - 170 + i * 88
        out.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{color}"/>')
        out.append(_text(lx + 14, 15, mt, "start"))
    out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#adb5bd"/>')
    out.append(_text(left - 6, top + 4, str(cmax), "end"))
    out.append(_text(left - 6, top + h, "0", "end"))
    for b in range(10):
        for i, mt in enumerate(metrics):
            c = counts[mt][b]
            if not c:
                continue
            bh = h * c / cmax
            sub = (bw - 4) / len(metrics)
            bx = left + b * bw + 2 + i * sub
            out.append(
                f'<rect x="{bx:.1f}" y="{top + h - bh:.1f}" width="{sub:.1f}" height="{bh:.1f}" fill="{METRIC_COLORS[mt]}">'
                f"<title>{mt} {b * 10}–{b * 10 + 10}: {c}</title></rect>"
            )
    for t in (0, 50, 100):
        out.append(_text(left + w * t / 100, top + h + 16, str(t)))
    out.append(_text(left + w / 2, height - 4, "per-candidate mean score"))
    out.append("</svg>")
    return "".join(out)


def svg_stacked(
    labels: list[str],
    stacks: list[dict[str, float]],
    colors: dict[str, str],
    value_fmt: Callable[[float], str],
    cumulative: bool = False,
    money: bool = False,
    width: int = 1060,
    height: int = 260,
    title: str = "",
) -> str:
    """Stacked bars per round; with `cumulative`, a line of the running total on the same axis."""
    if not labels:
        return ""
    totals = [sum(s.values()) for s in stacks]
    running = [sum(totals[: i + 1]) for i in range(len(totals))]
    top_v = max(running if cumulative else totals) or 1.0
    ymax, step = cost_mod.nice_axis(top_v, integer=not money)
    keys = sorted({k for s in stacks for k in s}, key=lambda k: (k not in colors, list(colors).index(k) if k in colors else 0, k))
    left, right, top, bottom = 70, 20, 34, 34
    w, h = width - left - right, height - top - bottom
    n = len(labels)
    bw = min(70.0, w / n * 0.6)

    def x(i: int) -> float:
        return left + w * (i + 0.5) / n

    def y(v: float) -> float:
        return top + h * (1 - v / ymax)

    out = [_svg_open(width, height, title)]
    for k in range(round(ymax / step) + 1):
        v = step * k
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e9ecef"/>')
        out.append(_text(left - 8, y(v) + 4, cost_mod.money_tick(v, step) if money else f"{v:,g}", "end"))
    for i, (label, stack) in enumerate(zip(labels, stacks, strict=True)):
        base = 0.0
        for key in keys:
            v = stack.get(key, 0.0)
            if v <= 0:
                continue
            out.append(
                f'<rect x="{x(i) - bw / 2:.1f}" y="{y(base + v):.1f}" width="{bw:.1f}" height="{y(base) - y(base + v):.1f}" '
                f'fill="{colors.get(key, OTHER_COLOR)}"><title>{escape(label)} {escape(key)}: {escape(value_fmt(v))}</title></rect>'
            )
            base += v
        if not cumulative:
            out.append(_text(x(i), y(base) - 6, value_fmt(base), fill="#212529", extra='font-weight="600"'))
        out.append(_text(x(i), top + h + 18, label))
    if cumulative:
        out.append(
            '<polyline fill="none" stroke="#212529" stroke-width="2" points="'
            + " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(running))
            + '"/>'
        )
        for i, v in enumerate(running):
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5" fill="#212529"/>')
            out.append(_text(x(i), y(v) - 8, value_fmt(v), fill="#212529", extra='font-weight="600"'))
    lx = left
    for key in keys + (["cumulative"] if cumulative else []):
        color = "#212529" if key == "cumulative" else colors.get(key, OTHER_COLOR)
        out.append(f'<rect x="{lx}" y="8" width="12" height="12" fill="{color}"/>')
        out.append(_text(lx + 16, 18, key, "start"))
        lx += 28 + 7 * len(key)
    out.append("</svg>")
    return "".join(out)


def data_stacks(view: ReportView) -> tuple[list[str], list[dict[str, float]]]:
    """Train set per round split into coverage pairs and synthetic pairs added so far."""
    labels, stacks, synth = [], [], 0
    for rv in view.rounds:
        if rv.train_examples is None:
            continue
        synth += rv.synthetic_added or 0
        labels.append(rv.label)
        cov = max(0, rv.train_examples - synth)
        stacks.append({"coverage": float(cov), "synthetic": float(rv.train_examples - cov)})
    return labels, stacks
