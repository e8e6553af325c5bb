"""The run report as one HTML page: self-contained (inline CSS and SVG), no scripts.

Model output and judge reasons are untrusted text: every value goes through `_e` (HTML
escaping), and the page's Content-Security-Policy forbids scripts altogether.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

from llamaduo import cost as cost_mod
from llamaduo.artifacts import METRICS
from llamaduo.report.charts import data_stacks, svg_histogram, svg_rounds, svg_stacked
from llamaduo.report.views import (
    AGREEMENT_HEAD,
    CALIBRATION_HEAD,
    CUT_TEXT,
    EXACT_HEAD,
    JUDGING_HEAD,
    PARITY_HEAD,
    PROBE_HEAD,
    STAGE_COLORS,
    STATS,
    ReportView,
    agreement_rows,
    calibration_rows,
    calibration_text,
    ci_text,
    clip,
    count_text,
    digits,
    exact_rows,
    fmt,
    fmt_usd,
    judging_rows,
    parity_rows,
    parity_verdict,
    passed_text,
    probe_rows,
    rule_text,
    simulated_text,
    stat_text,
    worst_scores_text,
)

CSS = """
:root { --ink:#212529; --muted:#6c757d; --line:#dee2e6; --bg:#f8f9fa; --pass:#2b8a3e; --fail:#c92a2a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 32px 48px; }
h1 { font-size:26px; margin:0 0 4px; } h2 { font-size:19px; margin:0 0 12px; }
h3 { font-size:15px; margin:16px 0 8px; }
.sub { color:var(--muted); margin:0 0 16px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:20px 24px; margin:18px 0; }
.banner { background:#fff3bf; border:1px solid #fcc419; border-radius:10px; padding:12px 16px; margin:14px 0; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px; margin:16px 0 0; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:12px 16px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:22px; font-weight:650; margin-top:2px; }
.card .d { color:var(--muted); font-size:13px; }
table { border-collapse:collapse; width:100%; font-size:13.5px; font-variant-numeric:tabular-nums; }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:right; vertical-align:top; }
th { background:#f1f3f5; font-weight:600; } th.group { text-align:center; border-left:2px solid #fff; }
td.l, th.l { text-align:left; } .ci { display:block; color:var(--muted); font-size:12px; white-space:nowrap; }
.pill { display:inline-block; padding:1px 9px; border-radius:999px; font-size:12px; font-weight:600; color:#fff; }
.pass { background:var(--pass); } .fail { background:var(--fail); } .na { background:#adb5bd; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(340px,1fr)); gap:14px; }
.item { border:1px solid var(--line); border-radius:8px; padding:12px 14px; margin:12px 0; }
.item .meta { color:var(--muted); font-size:13px; margin-bottom:6px; }
.texts { display:grid; grid-template-columns:1fr 1fr 1fr; gap:10px; }
.texts div > b { display:block; font-size:12px; color:var(--muted); text-transform:uppercase; margin-bottom:2px; }
pre { white-space:pre-wrap; word-break:break-word; background:var(--bg); border:1px solid var(--line);
  border-radius:6px; padding:8px; margin:0; font:12.5px/1.45 ui-monospace,"DejaVu Sans Mono",monospace; max-height:260px; overflow:auto; }
ul.reasons { margin:8px 0 0; padding-left:18px; font-size:13px; }
.note { color:var(--muted); font-size:13px; } code { font-size:12.5px; }
footer { color:var(--muted); font-size:12.5px; margin-top:22px; }
"""


def _e(v: Any) -> str:
    return escape(str(v), quote=True)


def _pill(p: bool | None) -> str:
    cls = "na" if p is None else ("pass" if p else "fail")
    return f'<span class="pill {cls}">{passed_text(p)}</span>'


def _table(head: list[str], rows: list[list[str]], text_cols: tuple[int, ...] = (0,)) -> str:
    """A table whose cells are already HTML; text columns align left, numbers right."""
    h = "".join(f'<th class="{"l" if i in text_cols else ""}">{c}</th>' for i, c in enumerate(head))
    thead = f"<thead><tr>{h}</tr></thead>" if any(head) else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i in text_cols else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _html_header(view: ReportView) -> str:
    best = view.best_round
    spend = view.cost.total_usd
    final = next((rv.train_examples for rv in reversed(view.rounds) if rv.train_examples is not None), None)
    cards = [
        ("state", _e(view.state), f"stop reason: {_e(view.stop_reason or 'n/a')}"),
        (
            "best round",
            _e(f"r{best:02d}" if best is not None else "n/a"),
            f"{_e(view.metric)} {_e(view.statistic)} {_e(fmt(view.best_value, digits(view.metric)))}",
        ),
        ("target", _e(fmt(view.target, digits(view.metric))), _e(rule_text(view))),
        ("service spend", _e(fmt_usd(spend)), f"{_e(count_text(view.cost.calls))} requests sent"),
        ("train examples", _e(count_text(final)), f"after {len(view.rounds)} round(s)"),
    ]
    cards_html = "".join(f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div><div class="d">{d}</div></div>' for k, v, d in cards)
    models = f"service model {_e(view.service_model or 'n/a')} · judge {_e(view.judge_model or 'n/a')}"
    banner = ""
    if view.simulated:
        banner = f'<div class="banner"><b>Simulated service LLM.</b> {_e(simulated_text(view))}</div>'
    return f"<header><h1>Migration report: {_e(view.name)}</h1><p class='sub'>{models}</p>{banner}<div class='cards'>{cards_html}</div></header>"


def _html_rounds(view: ReportView) -> str:
    if not view.rounds and not view.references:
        return "<section id='rounds'><h2>Rounds against the target</h2><p class='note'>n/a: no round has run yet.</p></section>"
    groups = "".join(f'<th class="group" colspan="4">{mt}</th>' for mt in METRICS)
    head1 = f'<tr><th class="l" colspan="3"></th>{groups}<th class="group" colspan="2">pass rule</th></tr>'
    cols = ["round", "train examples", "synthetic added"] + ["mean", "median", "cov@50", "cov@70"] * 2 + ["value", "result"]
    head2 = "<tr>" + "".join(f'<th class="{"l" if i == 0 else ""}">{c}</th>' for i, c in enumerate(cols)) + "</tr>"
    rows = []
    for rv in view.rounds + view.references:
        cells = [_e(rv.label) + (" ★" if rv.round is not None and rv.round == view.best_round else "")]
        cells += [_e(fmt(rv.train_examples, 0)) if rv.train_examples is not None else ("" if rv.round is None else "n/a")]
        cells += [_e(rv.synthetic_added) if rv.synthetic_added is not None else ("" if rv.round is None else "n/a")]
        for mt in METRICS:
            ci = ci_text(rv, mt)
            cells.append(_e(stat_text(rv, mt, "mean")) + (f' <span class="ci">{_e(ci)}</span>' if ci else ""))
            cells += [_e(stat_text(rv, mt, s)) for s in STATS[1:]]
        rel = f'<span class="ci">{rv.relative:.0%} of service</span>' if rv.relative is not None else ""
        cells += [_e(fmt(rv.value, digits(view.metric))) + rel if rv.round is not None else "", _pill(rv.passed) if rv.round is not None else ""]
        rows.append("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(cells)) + "</tr>")
    table = f"<table><thead>{head1}{head2}</thead><tbody>{''.join(rows)}</tbody></table>"
    chart = svg_rounds(view)
    warn = sorted({w for rv in view.rounds for w in rv.warnings})
    warn_html = "".join(f"<p class='note'>⚠ {_e(w)}</p>" for w in warn)
    return (
        "<section id='rounds'><h2>Rounds against the target</h2>"
        f"<p class='note'>Pass rule: {_e(rule_text(view))}. Scores are 1–100 per candidate (the mean of its judgments), "
        "with the 95% bootstrap interval of the mean below it; coverage@k is the share of candidates scoring at least k. "
        "★ marks the best round.</p>"
        f"{chart}{table}{warn_html}{_html_categories(view)}</section>"
    )


def _html_categories(view: ReportView) -> str:
    rv = next((r for r in view.rounds if r.round == view.best_round), None)
    if rv is None or rv.scores is None or not rv.scores.per_category:
        return ""
    per = rv.scores.per_category  # category → metric → mean (None: no judged candidate there)
    rows = [[_e(cat)] + [_e(fmt(vals.get(mt))) for mt in METRICS] for cat, vals in sorted(per.items())]
    return f"<h3>Per category, {_e(rv.label)} (mean)</h3>" + _table(["category", *METRICS], rows)


def _html_distributions(view: ReportView) -> str:
    panels = [svg_histogram(rv) for rv in view.rounds + view.references]
    panels = [p for p in panels if p]
    body = f"<div class='grid'>{''.join(f'<div>{p}</div>' for p in panels)}</div>" if panels else "<p class='note'>n/a: no judgments yet.</p>"
    return f"<section id='distributions'><h2>Score distributions</h2>{body}</section>"


def _html_cost(view: ReportView) -> str:
    c = view.cost
    if c.source == "none":
        return "<section id='cost'><h2>Service cost</h2><p class='note'>n/a: no service calls recorded.</p></section>"
    chart = svg_stacked(
        [lbl for lbl, _ in c.by_round], [s for _, s in c.by_round], STAGE_COLORS, fmt_usd, cumulative=True, money=True,
        title="service cost per round by stage, and cumulative",
    )
    rows = [
        [_e(stage), _e(f"{s.calls:,}"), _e(f"{s.cached:,}"), _e(f"{s.failed:,}"),
         _e(f"{s.input_tokens:,}"), _e(f"{s.output_tokens:,}"), _e(fmt_usd(s.usd)), _e(fmt_usd(s.saved_usd))]
        for stage, s in c.by_stage.items()
    ]
    if rows:
        rows.append(["<b>total</b>", "", "", "", "", "", f"<b>{_e(fmt_usd(c.total_usd))}</b>", _e(fmt_usd(c.saved_usd))])
    table = _table(["stage", "requests", "cache hits", "failed calls", "input tokens", "output tokens", "cost", "saved by cache"], rows) if rows else ""
    sim = " Prices of the simulated service are illustrative." if view.simulated else ""
    return (
        "<section id='cost'><h2>Service cost</h2>"
        f"<p class='note'>Bars: spend in each round by stage; line: cumulative spend. Source: {_e(c.source)}.{sim}</p>"
        f"{chart}{table}</section>"
    )


def _html_data(view: ReportView) -> str:
    labels, stacks = data_stacks(view)
    chart = svg_stacked(
        labels, stacks, {"coverage": "#1971c2", "synthetic": "#f08c00"}, lambda v: f"{v:,.0f}", title="training examples per round"
    )
    reasons = sorted({k for rv in view.rounds for k in rv.rejected})
    rows = [
        [_e(rv.label), _e(count_text(rv.synthetic_added)), _e(sum(rv.rejected.values()))]
        + [_e(rv.rejected.get(k, 0)) for k in reasons]
        for rv in view.rounds
        if rv.round
    ]
    table = _table(["round", "synthetic kept", "rejected"] + [_e(k) for k in reasons], rows) if rows else ""
    split = ""
    if view.split is not None:
        train, test = view.split
        split = f"<p class='note'>Coverage split: {_e(count_text(train))} train, {_e(count_text(test))} test.</p>"
    body = (chart + split + table) or "<p class='note'>n/a: no training data recorded yet.</p>"
    return f"<section id='data'><h2>Training data</h2>{body}</section>"


def _html_exact(view: ReportView) -> str:
    rows = [[_e(c) for c in r] for r in exact_rows(view)]
    if not rows:
        return ""  # a free-text task: the judge alone measures it
    return (
        "<section id='exact'><h2>Exact metrics of the structured answers</h2><p class='note'>Share of candidates "
        "(0–1, with the 95% bootstrap interval over test prompts) whose answer parses (json_valid), fits the response "
        "schema or the tools' parameters (schema_valid), calls the reference's functions (tool_name_match) with its "
        "arguments (arguments_exact); field_accuracy is the share of the reference's fields answered exactly. "
        "n/a: the metric does not apply to the task.</p>"
        f"{_table(EXACT_HEAD, rows)}</section>"
    )


def _html_judging(view: ReportView) -> str:
    rows = [[_e(c) for c in r] for r in judging_rows(view)]
    table = _table(JUDGING_HEAD, rows, (0, len(JUDGING_HEAD) - 1)) if rows else "<p class='note'>n/a</p>"
    agree = [[_e(c) for c in r] for r in agreement_rows(view)]
    panel = "<h3>Judge agreement</h3>" + _table(AGREEMENT_HEAD, agree, (0, 1, 2)) if agree else ""
    return (
        "<section id='judging'><h2>Judging health</h2><p class='note'>A failed judgment is a reply that never parsed as the "
        "required JSON (after retries) or a service error; it counts toward no score. An unjudged candidate had no valid "
        "judgment and is left out of the statistics; “not sent” candidates were never judged.</p>"
        f"{table}{panel}</section>"
    )


def _html_judge_card(view: ReportView) -> str:
    cal = view.calibration
    head = "<section id='judge-card'><h2>Judge card</h2>"
    if cal is None:
        return (head + "<p class='note'>n/a: the judge is not calibrated. Label candidates with <code>llamaduo review "
                "RUN_DIR</code>, then run <code>llamaduo calibrate RUN_DIR</code> (agreement with people and bias probes)."
                "</p></section>")
    note = re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(calibration_text(cal)))
    agree = _table(CALIBRATION_HEAD, [[_e(c) for c in r] for r in calibration_rows(cal)]) if cal.judges else ""
    rows = [[_e(c) for c in r[:-1]] + [_pill(None if r[-1] == "n/a" else r[-1] == "pass")] for r in probe_rows(cal)]
    probes = ("<h3>Bias probes</h3><p class='note'>Known answers through the run's judge: the reference must score high, "
              "an empty answer low; padding and an instruction to award 100 must not gain; swapping reference and "
              "candidate must not move similarity much.</p>" + _table(PROBE_HEAD, rows, (0, 1, 5))) if cal.probes else ""
    return f"{head}<p class='note'>{note}</p>{agree}{probes}</section>"


def _html_worst(view: ReportView) -> str:
    title = f"Lowest-scoring answers of round r{view.worst_round:02d}" if view.worst_round is not None else "Lowest-scoring answers"
    if not view.worst:
        return f"<section id='worst'><h2>{_e(title)}</h2><p class='note'>n/a: no judged candidates.</p></section>"
    items = []
    for it in view.worst:
        scores = worst_scores_text(it).replace(", ", " · ")
        failure = f"<li><b>exact check failed:</b> {_e(it.failure)}</li>" if it.failure else ""
        reasons = failure + ("".join(f"<li>{_e(r)}</li>" for r in it.reasons) or "<li>n/a</li>")
        cut = f" · <span class='pill fail'>{_e(CUT_TEXT)}</span>" if it.length_cut else ""
        items.append(
            f"<div class='item'><div class='meta'><b>{_e(it.prompt_id)}</b> · sample {it.sample_index} · "
            f"{_e(it.category)} · {_e(scores)}{cut}</div><div class='texts'>"
            f"<div><b>prompt</b><pre>{_e(clip(it.prompt))}</pre></div>"
            f"<div><b>reference</b><pre>{_e(clip(it.reference))}</pre></div>"
            f"<div><b>candidate</b><pre>{_e(clip(it.candidate))}</pre></div></div>"
            f"<ul class='reasons'>{reasons}</ul></div>"
        )
    return f"<section id='worst'><h2>{_e(title)}</h2><p class='note'>Sorted by {_e(view.metric)}, lowest first, with the judge's reasons.</p>{''.join(items)}</section>"


def _html_projection(view: ReportView) -> str:
    p = view.projection
    if p is None:
        note = re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(view.projection_note or "n/a"))
        return f"<section id='projection'><h2>Cost projection</h2><p class='note'>{note}</p></section>"
    rows = [[_e(k), _e(v)] for k, v in cost_mod.summary_rows(p)]
    return (
        "<section id='projection'><h2>Cost projection: service LLM vs local model</h2>"
        f"{cost_mod.chart_svg(p)}{_table(['', ''], rows, text_cols=(0, 1))}"
        "<p class='note'>Cumulative cost; the local line starts at the up-front cost (GPUs + this migration).</p></section>"
    )


def _html_production(view: ReportView) -> str:
    p = view.production
    if p is None:
        return ""
    spend = "n/a" if p.spend_usd is None else f"${p.spend_usd:.4f}"
    rows = [[str(w.id), str(w.n), fmt(w.value), f"[{fmt(w.ci_low)}, {fmt(w.ci_high)}]", fmt(w.target, 0), _e(w.state)]
            for w in p.windows]
    table = _table(["window", "pairs", _e(f"{view.statistic} {view.metric}"), "95% CI", "target", "state"], rows) if rows else ""
    events = "".join(f"<li>{_e(e.kind)}: {_e(e.reason)}</li>" for e in p.events)
    items = []
    for it in p.worst:
        prompt = next((m["content"] for m in reversed(it.messages) if m["role"] == "user"), "")
        reasons = "".join(f"<li>{_e(r)}</li>" for r in it.reasons.values() if r) or "<li>n/a</li>"
        items.append(
            f"<div class='item'><div class='meta'><b>live pair {it.id}</b> · score {_e(fmt(it.score))}</div>"
            f"<div class='texts'><div><b>prompt</b><pre>{_e(clip(prompt))}</pre></div>"
            f"<div><b>service answer</b><pre>{_e(clip(it.service_answer or ''))}</pre></div>"
            f"<div><b>local answer</b><pre>{_e(clip(it.local_answer))}</pre></div></div>"
            f"<ul class='reasons'>{reasons}</ul></div>"
        )
    state = "drifted" if p.drifted else "ok"
    return (f"<section id='production'><h2>Production (shadowed live traffic)</h2><p class='note'>State: <b>{state}</b>"
            f"{' (' + _e(p.reason) + ')' if p.reason else ''}; {p.pairs.get('judged', 0)} pairs judged; shadow spend "
            f"{_e(spend)}.</p>{table}{'<ul>' + events + '</ul>' if events else ''}{''.join(items)}</section>")


def _html_shipping(view: ReportView) -> str:
    p = view.parity
    if p is None:
        return ""
    bad = " style='color:var(--fail)'" if p.shipped_rejected else ""
    return (f"<section id='shipping'><h2>Shipping: judged through the runtime that serves it</h2>"
            f"<p{bad}><b>{_e(parity_verdict(p))}</b></p>"
            + _table(PARITY_HEAD, [[_e(c) for c in row] for row in parity_rows(p)], text_cols=(0, 1, 9))
            + f"<p class='note'>{_e(p.statistic)} {_e(p.metric)} per artifact on the test prompts, paired with round "
            f"{p.round} ({_e(fmt(p.round_value))}); gate: deploy.max_drop {p.max_drop:g} points.</p></section>")


def render_html(view: ReportView) -> str:
    """The whole report as one self-contained HTML page: no scripts, no external resources."""
    problems = "".join(f"<li>{_e(p)}</li>" for p in view.problems)
    foot = f"<p>Unreadable pieces (shown as n/a):</p><ul>{problems}</ul>" if problems else ""
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>llamaduo report: {_e(view.name)}</title><style>{CSS}</style></head><body><main>"
        + _html_header(view)
        + _html_rounds(view)
        + _html_exact(view)
        + _html_distributions(view)
        + _html_cost(view)
        + _html_data(view)
        + _html_judging(view)
        + _html_judge_card(view)
        + _html_worst(view)
        + _html_projection(view)
        + _html_production(view)
        + _html_shipping(view)
        + f"<footer>{foot}<p>Run {_e(view.name)} · updated {_e(view.updated_at or 'n/a')} · written by llamaduo.</p></footer>"
        + "</main></body></html>\n"
    )
