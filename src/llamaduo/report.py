"""The run report: `report.html` (self-contained, inline CSS and SVG) and `report.md`.

    html_path, md_path = write_report(RunStore("runs/demo"))

Everything is read from the run directory, defensively: a missing or unreadable piece is
shown as "n/a" and listed at the end, never an exception, because the loop rewrites the
report after every paid-for round. Model output and judge reasons are untrusted text: they
are HTML-escaped, and the page's Content-Security-Policy forbids scripts altogether.

This module collects what is shown (`collect` → `ReportView`); `report_render` writes it as HTML
and Markdown, with the SVG charts of `report_charts`.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
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
        best_value=number(m.get("best_value")),
        metric=str(rule.get("metric") or "precision"),
        statistic=str(rule.get("statistic") or "mean"),
        target=number(rule.get("threshold")),
        relative_to_service=number(rule.get("relative_to_service")),
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
    rv.value = number(decision.get("value", rec.get("value")))
    rv.target = number(decision.get("target"))
    passed = decision.get("passed", rec.get("passed"))
    rv.passed = passed if isinstance(passed, bool) else None
    rv.relative = number(decision.get("relative"))
    _fill_scores(rv, safe(f"{rv.label}/scores.json", lambda: read_json(store.scores_path(r)), None))
    _fill_judgments(rv, safe(f"{rv.label}/judgments.jsonl", lambda: read_jsonl(store.judgments_path(r)), []))
    rejected = safe(f"{rv.label}/rejected.jsonl", lambda: read_jsonl(store.rejected_path(r)), [])
    rv.rejected = Counter(str((x.get("reason") if isinstance(x, dict) else None) or "unknown") for x in rejected)
    if rv.synthetic_added is None and store.synthetic_path(r).exists():
        rv.synthetic_added = len(safe(f"{rv.label}/synthetic.jsonl", lambda: read_jsonl(store.synthetic_path(r)), []))
    tr = safe(f"{rv.label}/train.json", lambda: read_json(store.train_result_path(r)), {})
    if isinstance(tr, dict):
        rv.train_loss = number(tr.get("train_loss"))
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
            elif number(v) is not None:
                rv.per_category[str(cat)] = {"value": number(v)}
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
                        number(v.get("usd")) or 0.0, number(v.get("saved_usd")) or 0.0,
                    )
                )
    view = CostView(source=source)
    if not rows:
        total = _dig(manifest, "ledger", "total")
        if isinstance(total, dict):
            view.source, view.total_usd, view.calls = "manifest ledger", number(total.get("usd")), _int(total.get("calls"))
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


def number(v: Any) -> float | None:
    """A finite number as float; anything else (bool, NaN, text) as None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any) -> int | None:
    n = number(v)
    return int(n) if n is not None else None


def _metric_value(v: Any) -> float | None:
    """A judged score given as a number, or as {"score": n} / {"mean": n}."""
    if isinstance(v, dict):
        return number(v.get("score", v.get("mean")))
    return number(v)


def _aliases(stat: str) -> tuple[str, ...]:
    if stat.startswith("coverage@"):
        k = stat.split("@")[1]
        return (stat, f"coverage_{k}", f"coverage{k}", f"cov{k}", f"cov@{k}")
    return (stat,)


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    return next((number(d[k]) for k in keys if number(d.get(k)) is not None), None)


def _ci(ms: dict[str, Any]) -> tuple[float | None, float | None]:
    for key in ("ci", "ci95", "mean_ci", "ci_mean"):
        v = ms.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return number(v[0]), number(v[1])
        if isinstance(v, dict):
            return _first(v, ("low", "lo", "lower")), _first(v, ("high", "hi", "upper"))
    return _first(ms, ("ci_low", "ci_lo", "ci_lower")), _first(ms, ("ci_high", "ci_hi", "ci_upper"))


# ------------------------------------------------------------------ shared by the renderers
def fmt(v: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{suffix}"


def write_report(store: RunStore) -> tuple[Path, Path]:
    """Write report.html and report.md of a run directory atomically; returns both paths."""
    from llamaduo.report_render import render_html, render_markdown

    view = collect(store)
    atomic_write_text(store.report_html, render_html(view))
    atomic_write_text(store.report_md, render_markdown(view))
    return store.report_html, store.report_md
