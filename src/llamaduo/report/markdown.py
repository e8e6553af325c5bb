"""The run report as Markdown: the same numbers and texts as the HTML page, without charts."""

from __future__ import annotations

from html import escape
from typing import Any

from llamaduo import cost as cost_mod
from llamaduo.artifacts import METRICS
from llamaduo.report.views import (
    AGREEMENT_HEAD,
    CALIBRATION_HEAD,
    CUT_TEXT,
    EXACT_HEAD,
    JUDGING_HEAD,
    PARITY_HEAD,
    PROBE_HEAD,
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
    value_text,
    worst_scores_text,
)


def _md(v: Any) -> str:
    """A Markdown table cell: no pipes, no newlines, no raw HTML."""
    return escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _fence(text: str) -> list[str]:
    """A code fence longer than any backtick run inside, so untrusted text stays inert."""
    run = max((len(m) for m in text.replace("\r", "").split("\n") for m in _backtick_runs(m)), default=0)
    f = "`" * max(3, run + 1)
    return [f + "text", text, f]


def _backtick_runs(line: str) -> list[str]:
    runs, cur = [], ""
    for ch in line:
        if ch == "`":
            cur += ch
        elif cur:
            runs.append(cur)
            cur = ""
    return runs + ([cur] if cur else [])


def _md_header(view: ReportView) -> list[str]:
    L = [f"# Migration report: {_md(view.name)}", ""]
    if view.simulated:
        L += [f"> **Simulated service LLM.** {_md(simulated_text(view))}", ""]
    best = f"r{view.best_round:02d}" if view.best_round is not None else "n/a"
    return L + [
        f"- state: {_md(view.state)}; stop reason: {_md(view.stop_reason or 'n/a')}",
        f"- best round: {best} ({_md(view.metric)} {_md(view.statistic)} {fmt(view.best_value, digits(view.metric))})",
        f"- pass rule: {_md(rule_text(view))}",
        f"- service model: {_md(view.service_model or 'n/a')}; judge: {_md(view.judge_model or 'n/a')}",
        f"- service spend: {fmt_usd(view.cost.total_usd)} ({count_text(view.cost.calls)} requests sent)",
        "",
    ]


def _md_rounds(view: ReportView) -> list[str]:
    head = ["round", "train", "synthetic"]
    head += [f"{mt} {s}" for mt in METRICS for s in ("mean [CI]", "median", "cov@50", "cov@70")] + ["value", "result"]
    rows = []
    for rv in view.rounds + view.references:
        r = [_md(rv.label), _md(rv.train_examples if rv.train_examples is not None else ("" if rv.round is None else "n/a")),
             _md(rv.synthetic_added if rv.synthetic_added is not None else "")]
        for mt in METRICS:
            r += [_md(f"{stat_text(rv, mt, 'mean')} {ci_text(rv, mt)}".strip())]
            r += [_md(stat_text(rv, mt, s)) for s in STATS[1:]]
        r += [_md(value_text(rv, view.metric)) if rv.round is not None else "", passed_text(rv.passed) if rv.round is not None else ""]
        rows.append(r)
    L = ["## Rounds against the target", ""]
    return L + (_md_table(head, rows) if rows else ["n/a: no round has run yet.", ""])


def _md_exact(view: ReportView) -> list[str]:
    rows = exact_rows(view)
    if not rows:
        return []
    return ["## Exact metrics of the structured answers", "",
            "Share of candidates (0-1, 95% bootstrap interval over test prompts) whose answer parses (json_valid), fits the "
            "response schema or the tools' parameters (schema_valid), calls the reference's functions (tool_name_match) "
            "with its arguments (arguments_exact); field_accuracy is the share of the reference's fields answered "
            "exactly. n/a: the metric does not apply to the task.", ""] + _md_table(EXACT_HEAD, [[_md(c) for c in r] for r in rows])


def _md_cost(view: ReportView) -> list[str]:
    L = ["## Service cost", ""]
    c = view.cost
    if not c.by_stage:
        return L + [f"total: {fmt_usd(c.total_usd)}", ""]
    L += _md_table(
        ["stage", "requests", "cache hits", "failed calls", "input tokens", "output tokens", "cost"],
        [[_md(stage), str(s.calls), str(s.cached), str(s.failed), str(s.input_tokens), str(s.output_tokens), fmt_usd(s.usd)]
         for stage, s in c.by_stage.items()],
    )
    running, cum = 0.0, []
    for label, stages in c.by_round:
        running += sum(stages.values())
        cum.append([_md(label), fmt_usd(sum(stages.values())), fmt_usd(running)])
    return L + _md_table(["round", "spend", "cumulative"], cum)


def _md_data(view: ReportView) -> list[str]:
    reasons = sorted({k for rv in view.rounds for k in rv.rejected})
    return ["## Training data", ""] + _md_table(
        ["round", "train examples", "synthetic kept", "rejected"] + [_md(k) for k in reasons],
        [[_md(rv.label), _md(count_text(rv.train_examples)), _md(count_text(rv.synthetic_added)), str(sum(rv.rejected.values()))]
         + [str(rv.rejected.get(k, 0)) for k in reasons] for rv in view.rounds],
    )


def _md_judging(view: ReportView) -> list[str]:
    L = ["## Judging health", ""] + _md_table(JUDGING_HEAD, [[_md(c) for c in r] for r in judging_rows(view)])
    if view.rounds and any(rv.agreement for rv in view.rounds + view.references):
        L += _md_table(AGREEMENT_HEAD, [[_md(c) for c in r] for r in agreement_rows(view)])
    return L


def _md_judge_card(view: ReportView) -> list[str]:
    L = ["## Judge card", ""]
    cal = view.calibration
    if cal is None:
        return L + ["n/a: the judge is not calibrated; label with `llamaduo review RUN_DIR`, then run `llamaduo calibrate RUN_DIR`.", ""]
    L += [_md(calibration_text(cal)), ""]
    if cal.judges:
        L += _md_table(CALIBRATION_HEAD, [[_md(c) for c in r] for r in calibration_rows(cal)])
    if cal.probes:
        L += ["### Bias probes", ""] + _md_table(PROBE_HEAD, [[_md(c) for c in r] for r in probe_rows(cal)])
    return L


def _md_worst(view: ReportView) -> list[str]:
    if not view.worst:
        return []
    L = [f"## Lowest-scoring answers of round r{view.worst_round:02d}", ""]
    for it in view.worst:
        scores = worst_scores_text(it)
        cut = f" — **{CUT_TEXT}**" if it.length_cut else ""
        L += [f"### {_md(it.prompt_id)} (sample {it.sample_index}, {_md(it.category)}): {_md(scores)}{cut}", ""]
        if it.failure:
            L += [f"**exact check failed:** {_md(it.failure)}", ""]
        for name, text in (("prompt", it.prompt), ("reference", it.reference), ("candidate", it.candidate)):
            L += [f"**{name}**", "", *_fence(clip(text)), ""]
        L += [f"- {_md(r)}" for r in it.reasons] + [""]
    return L


def _md_projection(view: ReportView) -> list[str]:
    L = ["## Cost projection", ""]
    if view.projection is not None:
        return L + _md_table(["", ""], [[_md(k), _md(v)] for k, v in cost_mod.summary_rows(view.projection)])
    return L + [_md(view.projection_note or "n/a"), ""]


def _md_production(view: ReportView) -> list[str]:
    p = view.production
    if p is None:
        return []
    spend = "n/a" if p.spend_usd is None else f"${p.spend_usd:.4f}"
    L = ["## Production (shadowed live traffic)", "",
         f"State: **{'drifted' if p.drifted else 'ok'}**" + (f" ({_md(p.reason)})" if p.reason else "")
         + f"; {p.pairs.get('judged', 0)} pairs judged; shadow spend {spend}.", ""]
    rows = [[str(w.id), str(w.n), fmt(w.value), f"[{fmt(w.ci_low)}, {fmt(w.ci_high)}]", fmt(w.target, 0), w.state]
            for w in p.windows]
    L += _md_table(["window", "pairs", f"{view.statistic} {view.metric}", "95% CI", "target", "state"], rows) if rows else []
    L += [f"- {_md(e.kind)}: {_md(e.reason)}" for e in p.events] + ([""] if p.events else [])
    for it in p.worst:
        prompt = next((m["content"] for m in reversed(it.messages) if m["role"] == "user"), "")
        L += [f"### live pair {it.id}: score {fmt(it.score)}", ""]
        for name, text in (("prompt", prompt), ("service answer", it.service_answer or ""), ("local answer", it.local_answer)):
            L += [f"**{name}**", "", *_fence(clip(text)), ""]
        L += [f"- {_md(r)}" for r in it.reasons.values() if r] + [""]
    return L


def _md_shipping(view: ReportView) -> list[str]:
    p = view.parity
    if p is None:
        return []
    return (["## Shipping: judged through the runtime that serves it", "", f"**{_md(parity_verdict(p))}**", ""]
            + _md_table(PARITY_HEAD, [[_md(c) for c in row] for row in parity_rows(p)]) + [""])


def render_markdown(view: ReportView) -> str:
    """The report as Markdown: the same numbers and texts, without charts."""
    L = _md_header(view) + _md_rounds(view) + _md_exact(view) + _md_cost(view) + _md_data(view) + _md_judging(view) + _md_judge_card(view)
    L += _md_worst(view) + _md_projection(view) + _md_production(view) + _md_shipping(view)
    if view.problems:
        L += ["## Unreadable pieces (shown as n/a)", ""] + [f"- {_md(p)}" for p in view.problems] + [""]
    return "\n".join(L)
