"""The run report: `report.html` (self-contained, inline CSS and SVG) and `report.md`.

    html_path, md_path = write_report(RunStore("runs/demo"))

Everything is read from the run directory, defensively: a missing or unreadable piece is
shown as "n/a" and listed at the end, never an exception, because the loop rewrites the
report after every paid-for round. Model output and judge reasons are untrusted text: they
are HTML-escaped, and the page's Content-Security-Policy forbids scripts altogether.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, TypeVar

from llamaduo import cost as cost_mod
from llamaduo.store import RunStore, atomic_write_text, read_json, read_jsonl

METRICS = ("similarity", "precision")
STATS = ("mean", "median", "coverage@50", "coverage@70")
WORST_N = 5
TEXT_LIMIT = 1200  # characters of prompt/reference/candidate shown per worst item
STAGE_COLORS = {"synth": "#f08c00", "judge": "#1971c2", "baseline": "#7048e8", "accept": "#2b8a3e"}
OTHER_COLOR = "#868e96"
METRIC_COLORS = {"similarity": "#74c0fc", "precision": "#1864ab"}
T = TypeVar("T")


# ------------------------------------------------------------------ what is shown
@dataclass
class RoundView:
    label: str  # r00, r01, ... or "service baseline" / "served model"
    round: int | None = None
    train_examples: int | None = None
    synthetic_added: int | None = None
    stats: dict[str, dict[str, float | None]] = field(default_factory=dict)
    value: float | None = None
    target: float | None = None
    passed: bool | None = None
    relative: float | None = None  # local ÷ service baseline, when a baseline was judged
    counts: dict[str, int | None] = field(default_factory=dict)
    candidate_scores: dict[str, list[float]] = field(default_factory=dict)
    judge_errors: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    per_category: dict[str, dict[str, float | None]] = field(default_factory=dict)
    train_loss: float | None = None
    warnings: list[str] = field(default_factory=list)
    judge_models: list[str] = field(default_factory=list)
    agreement: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class WorstItem:
    prompt_id: str
    sample_index: int
    category: str
    prompt: str
    reference: str
    candidate: str
    scores: dict[str, float]
    reasons: list[str]


@dataclass
class CostView:
    source: str = "none"  # "service.sqlite", "manifest ledger" or "none"
    by_round: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # (label, stage -> usd)
    by_stage: list[dict[str, Any]] = field(default_factory=list)
    total_usd: float | None = None
    saved_usd: float | None = None
    calls: int | None = None


@dataclass
class ReportView:
    name: str
    state: str = "n/a"
    stop_reason: str | None = None
    best_round: int | None = None
    best_value: float | None = None
    metric: str = "precision"
    statistic: str = "mean"
    target: float | None = None
    relative_to_service: float | None = None  # the pass rule's ratio when it is relative
    simulated: bool = False
    simulator_label: str | None = None
    service_model: str | None = None
    judge_model: str | None = None
    updated_at: str | None = None
    rounds: list[RoundView] = field(default_factory=list)
    references: list[RoundView] = field(default_factory=list)  # service baseline, served model
    cost: CostView = field(default_factory=CostView)
    worst_round: int | None = None
    worst: list[WorstItem] = field(default_factory=list)
    data_stats: dict[str, Any] = field(default_factory=dict)
    projection: cost_mod.CostProjection | None = None
    projection_note: str = ""
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ collecting
def collect(store: RunStore) -> ReportView:
    """Read everything the report shows from a run directory; never raises on bad files."""
    problems: list[str] = []

    def safe(what: str, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except FileNotFoundError:
            return default
        except Exception as e:  # any unreadable piece becomes "n/a" plus a note
            problems.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            return default

    m = safe("manifest.json", store.load_manifest, {})
    m = m if isinstance(m, dict) else {}
    cfg = safe("config.yaml", lambda: _read_yaml(store.config_path), {})
    rule = _dig(cfg, "judge", "pass_rule") or {}
    view = ReportView(
        name=store.root.name,
        state=str(m.get("state") or "n/a"),
        stop_reason=m.get("stop_reason"),
        best_round=m.get("best_round") if isinstance(m.get("best_round"), int) else None,
        best_value=_num(m.get("best_value")),
        metric=str(rule.get("metric") or "precision"),
        statistic=str(rule.get("statistic") or "mean"),
        target=_num(rule.get("threshold")),
        relative_to_service=_num(rule.get("relative_to_service")),
        simulated=bool(m.get("simulated_service")),
        simulator_label=m.get("simulator_label") if isinstance(m.get("simulator_label"), str) else None,
        service_model=_dig(cfg, "service", "model"),
        judge_model=_dig(cfg, "judge", "model") or _dig(cfg, "service", "model"),
        updated_at=m.get("updated_at"),
        problems=problems,
    )
    m_rounds = m.get("rounds") if isinstance(m.get("rounds"), dict) else {}
    numbers = sorted(set(store.rounds()) | {int(k[1:]) for k in m_rounds if k[1:].isdigit()})
    tests = safe("data/test.jsonl", lambda: {str(t.get("id")): t for t in read_jsonl(store.test_path)}, {})
    for r in numbers:
        rec = m_rounds.get(f"r{r:02d}")
        rv = safe(f"round r{r:02d}", lambda r=r, rec=rec: _round_view(store, r, rec, safe), RoundView(label=f"r{r:02d}", round=r))
        view.rounds.append(rv)
        decision = _dig(rec, "decision") if isinstance(_dig(rec, "decision"), dict) else {}
        view.metric = str(decision.get("metric") or view.metric)
        view.statistic = str(decision.get("statistic") or view.statistic)
        view.target = rv.target if rv.target is not None else view.target
        if view.best_round == r and view.best_value is None:
            view.best_value = rv.value
    for label, d in (("service baseline", store.baseline_dir), ("served model", store.accept_dir)):
        scores = safe(f"{d.name}/scores.json", lambda d=d: read_json(d / "scores.json"), None)
        if scores is not None:
            rv = RoundView(label=label)
            _fill_scores(rv, scores)
            _fill_judgments(rv, safe(f"{d.name}/judgments.jsonl", lambda d=d: read_jsonl(d / "judgments.jsonl"), []))
            view.references.append(rv)
    used = sorted({m for rv in view.rounds for m in rv.judge_models})
    if used:
        view.judge_model = ", ".join(used)
    if view.best_round is None and view.rounds:
        valued = [rv for rv in view.rounds if rv.value is not None]
        if valued:
            best = max(valued, key=lambda rv: rv.value)  # type: ignore[arg-type, return-value]
            view.best_round, view.best_value = best.round, best.value
    view.cost = safe("service cost", lambda: _collect_cost(store, m), CostView())
    view.worst_round, view.worst = safe("worst items", lambda: _worst_items(store, view, tests), (None, []))
    view.data_stats = safe("data/stats.json", lambda: read_json(store.stats_path), {}) or {}
    _fill_projection(view, store, safe)
    return view


def _round_view(store: RunStore, r: int, rec: Any, safe: Callable[..., Any]) -> RoundView:
    """One round from its manifest record and its files."""
    rec = rec if isinstance(rec, dict) else {}
    rv = RoundView(label=f"r{r:02d}", round=r)
    rv.train_examples = _int(rec.get("train_examples"))
    rv.synthetic_added = _int(rec.get("synthetic_added"))
    decision = rec.get("decision") if isinstance(rec.get("decision"), dict) else {}
    rv.value = _num(decision.get("value", rec.get("value")))
    rv.target = _num(decision.get("target"))
    passed = decision.get("passed", rec.get("passed"))
    rv.passed = passed if isinstance(passed, bool) else None
    rv.relative = _num(decision.get("relative"))
    _fill_scores(rv, safe(f"{rv.label}/scores.json", lambda: read_json(store.scores_path(r)), None))
    _fill_judgments(rv, safe(f"{rv.label}/judgments.jsonl", lambda: read_jsonl(store.judgments_path(r)), []))
    rejected = safe(f"{rv.label}/rejected.jsonl", lambda: read_jsonl(store.rejected_path(r)), [])
    rv.rejected = Counter(str((x.get("reason") if isinstance(x, dict) else None) or "unknown") for x in rejected)
    if rv.synthetic_added is None and store.synthetic_path(r).exists():
        rv.synthetic_added = len(safe(f"{rv.label}/synthetic.jsonl", lambda: read_jsonl(store.synthetic_path(r)), []))
    tr = safe(f"{rv.label}/train.json", lambda: read_json(store.train_result_path(r)), {})
    if isinstance(tr, dict):
        rv.train_loss = _num(tr.get("train_loss"))
        if rv.train_examples is None:
            rv.train_examples = _int(tr.get("examples"))
    return rv


def _fill_scores(rv: RoundView, scores: Any) -> None:
    """Read a scores.json written by judge.compute_scores, whatever keys it carries."""
    if not isinstance(scores, dict):
        return
    metrics = scores.get("metrics") if isinstance(scores.get("metrics"), dict) else scores
    for metric in METRICS:
        ms = metrics.get(metric)
        if not isinstance(ms, dict):
            continue
        out: dict[str, float | None] = {s: _first(ms, _aliases(s)) for s in STATS}
        lo, hi = _ci(ms)
        out["ci_low"], out["ci_high"] = lo, hi
        rv.stats[metric] = out
    counts = scores.get("counts") if isinstance(scores.get("counts"), dict) else scores
    for key, aliases in {
        "candidates": ("candidates", "n_candidates"),
        "judgments": ("judgments", "n_judgments"),
        "failed": ("failed", "failed_judgments", "n_failed"),
        "judged": ("judged", "n_judged"),
        "unjudged": ("unjudged", "unjudged_candidates", "n_unjudged"),
        "missing": ("missing", "n_missing"),
    }.items():
        rv.counts[key] = next((_int(counts[a]) for a in aliases if _int(counts.get(a)) is not None), None)
    per_cat = scores.get("per_category")
    if isinstance(per_cat, dict):
        for cat, v in per_cat.items():
            if isinstance(v, dict):
                rv.per_category[str(cat)] = {mt: _metric_value(v.get(mt)) for mt in METRICS}
            elif _num(v) is not None:
                rv.per_category[str(cat)] = {"value": _num(v)}
    warns = scores.get("warnings")
    if isinstance(warns, list):
        rv.warnings += [str(w) for w in warns]
    if isinstance(scores.get("judge_models"), list):
        rv.judge_models = [str(m) for m in scores["judge_models"]]
    if isinstance(scores.get("agreement"), list):
        rv.agreement = [a for a in scores["agreement"] if isinstance(a, dict)]


def _fill_judgments(rv: RoundView, judgments: list[dict[str, Any]]) -> None:
    """Per-candidate mean scores (the distribution) and the failed judgments with their errors."""
    for metric, scores in candidate_means(judgments).items():
        rv.candidate_scores[metric] = sorted(scores.values())
    for j in judgments:
        if not isinstance(j, dict) or j.get("ok") is False:
            err = str((j.get("error") if isinstance(j, dict) else None) or "unparseable judgment")
            rv.judge_errors[err.splitlines()[0][:120]] += 1
    if judgments:  # counts from the rows themselves when scores.json lacks them
        keys = {(j.get("prompt_id"), j.get("sample_index")) for j in judgments if isinstance(j, dict)}
        judged = len(set().union(*(set(m) for m in candidate_means(judgments).values())))
        derived = {"candidates": len(keys), "judged": judged, "unjudged": len(keys) - judged,
                   "judgments": len(judgments), "failed": sum(rv.judge_errors.values())}
        for key, value in derived.items():
            if rv.counts.get(key) is None:
                rv.counts[key] = value


def candidate_means(judgments: list[dict[str, Any]]) -> dict[str, dict[tuple[str, int], float]]:
    """metric → (prompt_id, sample_index) → mean over that candidate's successful judgments."""
    acc: dict[str, dict[tuple[str, int], list[float]]] = {mt: defaultdict(list) for mt in METRICS}
    for j in judgments:
        if not isinstance(j, dict) or j.get("ok") is False:
            continue
        key = (str(j.get("prompt_id")), _int(j.get("sample_index")) or 0)
        for mt in METRICS:
            v = _metric_value(j.get(mt))
            if v is not None:
                acc[mt][key].append(v)
    return {mt: {k: sum(v) / len(v) for k, v in d.items() if v} for mt, d in acc.items()}


def _collect_cost(store: RunStore, manifest: dict[str, Any]) -> CostView:
    """Spend per (stage, round): from the call log when present, else the manifest's ledger."""
    rows: list[tuple[str, int | None, int, int, int, int, int, float, float]] = []
    source = "none"
    if store.service_db.exists():
        # Read-only, so a report never takes a write lock on a log a running client owns.
        conn = sqlite3.connect(f"{store.service_db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            have = {r[1] for r in conn.execute("PRAGMA table_info(calls)")}

            def col(name: str, default: str = "0") -> str:  # older logs may lack a column
                return name if name in have else default

            q = (
                f"SELECT COALESCE({col('stage', 'NULL')},''), {col('round', 'NULL')},"
                " SUM(status!='cached'), SUM(status='cached'), SUM(status='failed'),"
                f" COALESCE(SUM(CASE WHEN status!='cached' THEN {col('input_tokens')} END),0),"
                f" COALESCE(SUM(CASE WHEN status!='cached' THEN {col('output_tokens')} END),0),"
                f" COALESCE(SUM({col('cost_usd')}),0), COALESCE(SUM({col('saved_usd')}),0)"
                " FROM calls GROUP BY 1, 2"
            )
            rows = [tuple(r) for r in conn.execute(q).fetchall()]  # type: ignore[misc]
            source = "service.sqlite"
        finally:
            conn.close()
    else:
        by_stage = _dig(manifest, "ledger", "by_stage")
        if isinstance(by_stage, dict):
            source = "manifest ledger"
            for key, v in by_stage.items():
                if not isinstance(v, dict):
                    continue
                stage, _, rnd = str(key).partition("/r")
                rows.append(
                    (
                        stage, int(rnd) if rnd.isdigit() else None,
                        _int(v.get("calls")) or 0, _int(v.get("cached")) or 0, _int(v.get("failed")) or 0,
                        _int(v.get("input_tokens")) or 0, _int(v.get("output_tokens")) or 0,
                        _num(v.get("usd")) or 0.0, _num(v.get("saved_usd")) or 0.0,
                    )
                )
    view = CostView(source=source)
    if not rows:
        total = _dig(manifest, "ledger", "total")
        if isinstance(total, dict):
            view.source, view.total_usd, view.calls = "manifest ledger", _num(total.get("usd")), _int(total.get("calls"))
        return view
    stages: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0.0, 0.0])
    per_round: dict[int | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for stage, rnd, *nums in rows:
        stage = stage or "other"
        for i, v in enumerate(nums):
            stages[stage][i] += v or 0
        per_round[rnd][stage] += float(nums[5] or 0)
    view.by_stage = [
        dict(zip(("stage", "calls", "cached", "failed", "input_tokens", "output_tokens", "usd", "saved_usd"), [s, *v], strict=True))
        for s, v in sorted(stages.items(), key=lambda kv: -kv[1][5])
    ]
    # Calls without a round (the service baseline) are paid before round 0 starts.
    order = sorted(per_round, key=lambda r: -1 if r is None else r)
    view.by_round = [("before r00" if r is None else f"r{r:02d}", dict(per_round[r])) for r in order]
    view.total_usd = sum(v[5] for v in stages.values())
    view.saved_usd = sum(v[6] for v in stages.values())
    view.calls = int(sum(v[0] for v in stages.values()))
    return view


def _worst_items(store: RunStore, view: ReportView, tests: dict[str, dict[str, Any]]) -> tuple[int | None, list[WorstItem]]:
    """The lowest-scoring candidates of the best round, with their texts and the judge's reasons."""
    judged = [rv.round for rv in view.rounds if rv.candidate_scores and rv.round is not None]
    if not judged:
        return None, []
    r = view.best_round if view.best_round in judged else judged[-1]
    judgments = read_jsonl(store.judgments_path(r))
    means = candidate_means(judgments)
    order = means.get(view.metric) or next(iter(v for v in means.values() if v), {})
    worst = sorted(order, key=lambda k: (order[k], k))[:WORST_N]
    preds = {}
    if store.predictions_path(r).exists():
        preds = {(str(p.get("prompt_id")), _int(p.get("sample_index")) or 0): p for p in read_jsonl(store.predictions_path(r))}
    reasons: dict[tuple[str, int], list[str]] = defaultdict(list)
    for j in judgments:
        key = (str(j.get("prompt_id")), _int(j.get("sample_index")) or 0)
        for mt in METRICS:
            raw = j.get(mt)
            reason = j.get(f"{mt}_reason") or (raw.get("reason") if isinstance(raw, dict) else None)
            line = f"{mt}: {reason}" if reason else None
            if line and line not in reasons[key] and len(reasons[key]) < 4:
                reasons[key].append(line)
    items = []
    for key in worst:
        test = tests.get(key[0]) or {}
        msgs = test.get("messages") if isinstance(test.get("messages"), list) else []
        prompt = next((str(x.get("content", "")) for x in reversed(msgs[:-1]) if isinstance(x, dict) and x.get("role") == "user"), "")
        reference = str(msgs[-1].get("content", "")) if msgs and isinstance(msgs[-1], dict) else ""
        items.append(
            WorstItem(
                prompt_id=key[0],
                sample_index=key[1],
                category=str(test.get("category") or "n/a"),
                prompt=prompt or "n/a",
                reference=reference or "n/a",
                candidate=str((preds.get(key) or {}).get("text", "n/a")),
                scores={mt: means[mt][key] for mt in METRICS if key in means.get(mt, {})},
                reasons=reasons.get(key, []),
            )
        )
    return r, items


def _fill_projection(view: ReportView, store: RunStore, safe: Callable[..., Any]) -> None:
    if cost_mod.saved_inputs(store) is None:
        view.projection_note = (
            "No cost projection yet: give the monthly token volume once with "
            "`llamaduo cost RUN_DIR --input-tokens-per-month N --output-tokens-per-month N --save`."
        )
        return
    inputs = safe("cost inputs", lambda: cost_mod.from_run(store), None)
    if inputs is not None:
        view.projection = cost_mod.project(inputs)


# ------------------------------------------------------------------ small readers
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    return tree if isinstance(tree, dict) else {}


def _dig(tree: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any) -> int | None:
    n = _num(v)
    return int(n) if n is not None else None


def _metric_value(v: Any) -> float | None:
    """A judged score given as a number, or as {"score": n} / {"mean": n}."""
    if isinstance(v, dict):
        return _num(v.get("score", v.get("mean")))
    return _num(v)


def _aliases(stat: str) -> tuple[str, ...]:
    if stat.startswith("coverage@"):
        k = stat.split("@")[1]
        return (stat, f"coverage_{k}", f"coverage{k}", f"cov{k}", f"cov@{k}")
    return (stat,)


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    return next((_num(d[k]) for k in keys if _num(d.get(k)) is not None), None)


def _ci(ms: dict[str, Any]) -> tuple[float | None, float | None]:
    for key in ("ci", "ci95", "mean_ci", "ci_mean"):
        v = ms.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return _num(v[0]), _num(v[1])
        if isinstance(v, dict):
            return _first(v, ("low", "lo", "lower")), _first(v, ("high", "hi", "upper"))
    return _first(ms, ("ci_low", "ci_lo", "ci_lower")), _first(ms, ("ci_high", "ci_hi", "ci_upper"))


# ------------------------------------------------------------------ formatting
def fmt(v: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{suffix}"


def fmt_usd(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"${v:,.4f}" if abs(v) < 1 else f"${v:,.2f}"


def _stat_text(stats: dict[str, float | None], stat: str) -> str:
    return fmt(stats.get(stat), 1, "%" if stat.startswith("coverage") else "")


def _ci_text(stats: dict[str, float | None]) -> str:
    lo, hi = stats.get("ci_low"), stats.get("ci_high")
    return "" if lo is None or hi is None else f"[{lo:.1f}, {hi:.1f}]"


def _rule_text(view: ReportView) -> str:
    what = f"{view.metric} {view.statistic}"
    if view.relative_to_service is not None:  # the target is then ratio × the service's own statistic
        return f"{what} ≥ {view.relative_to_service:.0%} of the service LLM's ({fmt(view.target)})"
    return f"{what} ≥ {fmt(view.target)}"


def _value_text(rv: RoundView) -> str:
    rel = f" ({rv.relative:.0%} of service)" if rv.relative is not None else ""
    return fmt(rv.value) + rel


def _simulated_text(view: ReportView) -> str:
    label = view.simulator_label or "The service LLM in this run was the offline simulator."
    return f"{label} Scores and costs illustrate the pipeline; they are not a real service model's."


def _passed_text(p: bool | None) -> str:
    return "n/a" if p is None else ("pass" if p else "fail")


# ------------------------------------------------------------------ SVG charts
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
    ymax, step = (100.0, 25.0) if hi <= 100 else cost_mod.nice_axis(hi * 1.05)
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
        out.append(_text(left + w, y(view.target) - 6, f"target {fmt(view.target, 1)}", "end", "#c92a2a"))
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
        out.append(_text(x(i), y(v) - 10, fmt(v, 1), fill="#212529", extra='font-weight="600"'))
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


def _data_stacks(view: ReportView) -> tuple[list[str], list[dict[str, float]]]:
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


# ------------------------------------------------------------------ HTML
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
    return f'<span class="pill {cls}">{_passed_text(p)}</span>'


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
            f"{_e(view.metric)} {_e(view.statistic)} {_e(fmt(view.best_value, 1))}",
        ),
        ("target", _e(fmt(view.target, 1)), _e(_rule_text(view))),
        ("service spend", _e(fmt_usd(spend)), f"{_e(view.cost.calls if view.cost.calls is not None else 'n/a')} requests sent"),
        ("train examples", _e(final if final is not None else "n/a"), f"after {len(view.rounds)} round(s)"),
    ]
    cards_html = "".join(f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div><div class="d">{d}</div></div>' for k, v, d in cards)
    models = f"service model {_e(view.service_model or 'n/a')} · judge {_e(view.judge_model or 'n/a')}"
    banner = ""
    if view.simulated:
        banner = f'<div class="banner"><b>Simulated service LLM.</b> {_e(_simulated_text(view))}</div>'
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
            st = rv.stats.get(mt, {})
            ci = _ci_text(st)
            cells.append(_e(_stat_text(st, "mean")) + (f' <span class="ci">{_e(ci)}</span>' if ci else ""))
            cells += [_e(_stat_text(st, s)) for s in STATS[1:]]
        rel = f'<span class="ci">{rv.relative:.0%} of service</span>' if rv.relative is not None else ""
        cells += [_e(fmt(rv.value)) + rel if rv.round is not None else "", _pill(rv.passed) if rv.round is not None else ""]
        rows.append("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(cells)) + "</tr>")
    table = f"<table><thead>{head1}{head2}</thead><tbody>{''.join(rows)}</tbody></table>"
    chart = svg_rounds(view)
    warn = sorted({w for rv in view.rounds for w in rv.warnings})
    warn_html = "".join(f"<p class='note'>⚠ {_e(w)}</p>" for w in warn)
    return (
        "<section id='rounds'><h2>Rounds against the target</h2>"
        f"<p class='note'>Pass rule: {_e(_rule_text(view))}. Scores are 1–100 per candidate (the mean of its judgments), "
        "with the 95% bootstrap interval of the mean below it; coverage@k is the share of candidates scoring at least k. "
        "★ marks the best round.</p>"
        f"{chart}{table}{warn_html}{_html_categories(view)}</section>"
    )


def _html_categories(view: ReportView) -> str:
    rv = next((r for r in view.rounds if r.round == view.best_round), None)
    if rv is None or not rv.per_category:
        return ""
    keys = sorted({k for v in rv.per_category.values() for k in v})
    rows = [[_e(cat)] + [_e(fmt(vals.get(k))) for k in keys] for cat, vals in sorted(rv.per_category.items())]
    return f"<h3>Per category, {_e(rv.label)} (mean)</h3>" + _table(["category"] + [_e(k) for k in keys], rows)


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
        [_e(s["stage"]), _e(f"{int(s['calls']):,}"), _e(f"{int(s['cached']):,}"), _e(f"{int(s['failed']):,}"),
         _e(f"{int(s['input_tokens']):,}"), _e(f"{int(s['output_tokens']):,}"), _e(fmt_usd(s["usd"])), _e(fmt_usd(s["saved_usd"]))]
        for s in c.by_stage
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
    labels, stacks = _data_stacks(view)
    chart = svg_stacked(
        labels, stacks, {"coverage": "#1971c2", "synthetic": "#f08c00"}, lambda v: f"{v:,.0f}", title="training examples per round"
    )
    reasons = sorted({k for rv in view.rounds for k in rv.rejected})
    rows = [
        [_e(rv.label), _e(rv.synthetic_added if rv.synthetic_added is not None else "n/a"), _e(sum(rv.rejected.values()))]
        + [_e(rv.rejected.get(k, 0)) for k in reasons]
        for rv in view.rounds
        if rv.round
    ]
    table = _table(["round", "synthetic kept", "rejected"] + [_e(k) for k in reasons], rows) if rows else ""
    ds = view.data_stats
    split = ""
    if isinstance(ds, dict) and (ds.get("train") or ds.get("test")):
        tr, te = ds.get("train"), ds.get("test")
        tr_n = tr.get("count", tr.get("examples")) if isinstance(tr, dict) else tr
        te_n = te.get("count", te.get("examples")) if isinstance(te, dict) else te
        split = f"<p class='note'>Coverage split: {_e(tr_n if tr_n is not None else 'n/a')} train, {_e(te_n if te_n is not None else 'n/a')} test.</p>"
    body = (chart + split + table) or "<p class='note'>n/a: no training data recorded yet.</p>"
    return f"<section id='data'><h2>Training data</h2>{body}</section>"


JUDGING_HEAD = ["round", "candidates", "judged", "unjudged", "not sent", "judgments", "failed judgments", "most common failure"]
AGREEMENT_HEAD = ["round", "judges", "metric", "candidates", "Pearson r", "mean abs. difference"]


def _judging_rows(view: ReportView) -> list[list[str]]:
    """Plain-text rows (escape before use): counts of judged and failed per round."""
    rows = []
    for rv in view.rounds + view.references:
        err = rv.judge_errors.most_common(1)
        counts = [str(rv.counts[k]) if rv.counts.get(k) is not None else "n/a"
                  for k in ("candidates", "judged", "unjudged", "missing", "judgments", "failed")]
        rows.append([rv.label, *counts, f"{err[0][0]} (×{err[0][1]})" if err else "—"])
    return rows


def _agreement_rows(view: ReportView) -> list[list[str]]:
    """Plain-text rows: how far the judges of a panel agree, per round and metric."""
    return [
        [rv.label, " vs ".join(str(j) for j in a.get("judges") or []), str(a.get("metric", "n/a")),
         str(a.get("n", "n/a")), fmt(_num(a.get("pearson")), 2), fmt(_num(a.get("mean_abs_diff")))]
        for rv in view.rounds + view.references
        for a in rv.agreement
    ]


def _html_judging(view: ReportView) -> str:
    rows = [[_e(c) for c in r] for r in _judging_rows(view)]
    table = _table(JUDGING_HEAD, rows, (0, 7)) if rows else "<p class='note'>n/a</p>"
    agree = [[_e(c) for c in r] for r in _agreement_rows(view)]
    panel = "<h3>Judge agreement</h3>" + _table(AGREEMENT_HEAD, agree, (0, 1, 2)) if agree else ""
    return (
        "<section id='judging'><h2>Judging health</h2><p class='note'>A failed judgment is a reply that never parsed as the "
        "required JSON (after retries) or a service error; it counts toward no score. An unjudged candidate had no valid "
        "judgment and is left out of the statistics; “not sent” candidates were never judged.</p>"
        f"{table}{panel}</section>"
    )


def _clip(s: str) -> str:
    return s if len(s) <= TEXT_LIMIT else s[:TEXT_LIMIT] + f" … [{len(s) - TEXT_LIMIT:,} more characters]"


def _html_worst(view: ReportView) -> str:
    title = f"Lowest-scoring answers of round r{view.worst_round:02d}" if view.worst_round is not None else "Lowest-scoring answers"
    if not view.worst:
        return f"<section id='worst'><h2>{_e(title)}</h2><p class='note'>n/a: no judged candidates.</p></section>"
    items = []
    for it in view.worst:
        scores = " · ".join(f"{mt} {v:.1f}" for mt, v in it.scores.items())
        reasons = "".join(f"<li>{_e(r)}</li>" for r in it.reasons) or "<li>n/a</li>"
        items.append(
            f"<div class='item'><div class='meta'><b>{_e(it.prompt_id)}</b> · sample {it.sample_index} · "
            f"{_e(it.category)} · {_e(scores)}</div><div class='texts'>"
            f"<div><b>prompt</b><pre>{_e(_clip(it.prompt))}</pre></div>"
            f"<div><b>reference</b><pre>{_e(_clip(it.reference))}</pre></div>"
            f"<div><b>candidate</b><pre>{_e(_clip(it.candidate))}</pre></div></div>"
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
        + _html_distributions(view)
        + _html_cost(view)
        + _html_data(view)
        + _html_judging(view)
        + _html_worst(view)
        + _html_projection(view)
        + f"<footer>{foot}<p>Run {_e(view.name)} · updated {_e(view.updated_at or 'n/a')} · written by llamaduo.</p></footer>"
        + "</main></body></html>\n"
    )


# ------------------------------------------------------------------ Markdown
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


def render_markdown(view: ReportView) -> str:
    """The report as Markdown: the same numbers and texts, without charts."""
    L = [f"# Migration report: {_md(view.name)}", ""]
    if view.simulated:
        L += [f"> **Simulated service LLM.** {_md(_simulated_text(view))}", ""]
    best = f"r{view.best_round:02d}" if view.best_round is not None else "n/a"
    L += [
        f"- state: {_md(view.state)}; stop reason: {_md(view.stop_reason or 'n/a')}",
        f"- best round: {best} ({_md(view.metric)} {_md(view.statistic)} {fmt(view.best_value, 1)})",
        f"- pass rule: {_md(_rule_text(view))}",
        f"- service model: {_md(view.service_model or 'n/a')}; judge: {_md(view.judge_model or 'n/a')}",
        f"- service spend: {fmt_usd(view.cost.total_usd)} ({view.cost.calls if view.cost.calls is not None else 'n/a'} requests sent)",
        "",
        "## Rounds against the target",
        "",
    ]
    head = ["round", "train", "synthetic"] + [f"{mt} {s}" for mt in METRICS for s in ("mean [CI]", "median", "cov@50", "cov@70")] + ["value", "result"]
    rows = []
    for rv in view.rounds + view.references:
        r = [_md(rv.label), _md(rv.train_examples if rv.train_examples is not None else ("" if rv.round is None else "n/a")),
             _md(rv.synthetic_added if rv.synthetic_added is not None else "")]
        for mt in METRICS:
            st = rv.stats.get(mt, {})
            r += [_md(f"{_stat_text(st, 'mean')} {_ci_text(st)}".strip())] + [_md(_stat_text(st, s)) for s in STATS[1:]]
        r += [_md(_value_text(rv)) if rv.round is not None else "", _passed_text(rv.passed) if rv.round is not None else ""]
        rows.append(r)
    L += _md_table(head, rows) if rows else ["n/a: no round has run yet.", ""]
    L += ["## Service cost", ""]
    if view.cost.by_stage:
        L += _md_table(
            ["stage", "requests", "cache hits", "failed calls", "input tokens", "output tokens", "cost"],
            [[_md(s["stage"]), str(int(s["calls"])), str(int(s["cached"])), str(int(s["failed"])), str(int(s["input_tokens"])),
              str(int(s["output_tokens"])), fmt_usd(s["usd"])] for s in view.cost.by_stage],
        )
        running = 0.0
        cum = []
        for label, stages in view.cost.by_round:
            running += sum(stages.values())
            cum.append([_md(label), fmt_usd(sum(stages.values())), fmt_usd(running)])
        L += _md_table(["round", "spend", "cumulative"], cum)
    else:
        L += [f"total: {fmt_usd(view.cost.total_usd)}", ""]
    L += ["## Training data", ""]
    reasons = sorted({k for rv in view.rounds for k in rv.rejected})
    L += _md_table(
        ["round", "train examples", "synthetic kept", "rejected"] + [_md(k) for k in reasons],
        [[_md(rv.label), _md(rv.train_examples if rv.train_examples is not None else "n/a"),
          _md(rv.synthetic_added if rv.synthetic_added is not None else "n/a"), str(sum(rv.rejected.values()))]
         + [str(rv.rejected.get(k, 0)) for k in reasons] for rv in view.rounds],
    )
    L += ["## Judging health", ""]
    L += _md_table(JUDGING_HEAD, [[_md(c) for c in r] for r in _judging_rows(view)])
    if view.rounds and any(rv.agreement for rv in view.rounds + view.references):
        L += _md_table(AGREEMENT_HEAD, [[_md(c) for c in r] for r in _agreement_rows(view)])
    if view.worst:
        L += [f"## Lowest-scoring answers of round r{view.worst_round:02d}", ""]
        for it in view.worst:
            scores = ", ".join(f"{mt} {v:.1f}" for mt, v in it.scores.items())
            L += [f"### {_md(it.prompt_id)} (sample {it.sample_index}, {_md(it.category)}): {scores}", ""]
            for name, text in (("prompt", it.prompt), ("reference", it.reference), ("candidate", it.candidate)):
                L += [f"**{name}**", "", *_fence(_clip(text)), ""]
            L += [f"- {_md(r)}" for r in it.reasons] + [""]
    L += ["## Cost projection", ""]
    if view.projection is not None:
        L += _md_table(["", ""], [[_md(k), _md(v)] for k, v in cost_mod.summary_rows(view.projection)])
    else:
        L += [_md(view.projection_note or "n/a"), ""]
    if view.problems:
        L += ["## Unreadable pieces (shown as n/a)", ""] + [f"- {_md(p)}" for p in view.problems] + [""]
    return "\n".join(L)


def write_report(store: RunStore) -> tuple[Path, Path]:
    """Write report.html and report.md of a run directory atomically; returns both paths."""
    view = collect(store)
    atomic_write_text(store.report_html, render_html(view))
    atomic_write_text(store.report_md, render_markdown(view))
    return store.report_html, store.report_md
