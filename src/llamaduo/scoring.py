"""Statistics of judgments and the pass rule.

A candidate's score is the mean of its valid judgments. `compute_scores` reports, per metric,
mean, median, coverage@50/@70 (percent of candidates scoring at least 50 / 70) and a 95 % CI of
the mean from a bootstrap over test prompts (a prompt's K candidates are not independent).
A candidate without a single valid judgment is counted in `counts.unjudged` and left out of the
statistics (a zero would measure the judge's reliability, not the model); a statistic with no
judged candidate is None — shown as n/a, never as 0. With a judge panel, `agreement` reports per
pair of judges the Pearson correlation and mean absolute difference of their per-candidate means.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from llamaduo.artifacts import (
    EXACT_METRICS,
    METRICS,
    Agreement,
    Calibration,
    Counts,
    Judgment,
    MetricStats,
    PassDecision,
    Scores,
)
from llamaduo.config import Config, PassCondition, PassRule
from llamaduo.data import Example
from llamaduo.errors import UserError
from llamaduo.judge import judge_models

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _field(pred: Any, name: str, default: Any = None) -> Any:
    return pred.get(name, default) if isinstance(pred, dict) else getattr(pred, name, default)


# --------------------------------------------------------------------- statistics
def candidate_facts(predictions: Iterable[Any]) -> tuple[int, int]:
    """(duplicates, length_cut): candidates identical to an earlier one of the same prompt (judged
    once), and candidates the token limit cut off."""
    seen: dict[str, set[str]] = {}
    duplicates = length_cut = 0
    for p in predictions:
        if _field(p, "finish_reason") == "length":
            length_cut += 1
        text = _field(p, "text")
        if _field(p, "ok", True) is False or text is None:
            continue
        texts = seen.setdefault(str(_field(p, "prompt_id")), set())
        duplicates += str(text).strip() in texts
        texts.add(str(text).strip())
    return duplicates, length_cut


def bootstrap_ci(
    values: Sequence[float], groups: Sequence[str] | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float]:
    """Percentile bootstrap 95 % CI of the mean (seeded, so a rerun writes the same file).

    With `groups` (the test prompt of each value) whole prompts are resampled: a prompt's K
    candidates share its difficulty, so treating them as independent would narrow the interval."""
    a = np.asarray(values, dtype=float)
    keys = np.arange(len(a)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sums = np.bincount(keys, weights=a)
    sizes = np.bincount(keys).astype(float)
    g = len(sums)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // max(1, g))  # bounded scratch memory for large rounds
    for s in range(0, resamples, step):
        e = min(resamples, s + step)
        idx = rng.integers(0, g, size=(e - s, g))
        means[s:e] = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def metric_stats(values: Sequence[float], groups: Sequence[str] | None = None) -> MetricStats:
    if not values:
        return MetricStats()
    a = np.asarray(values, dtype=float)
    return MetricStats(
        n=len(a),
        mean=round(float(a.mean()), 4),
        median=round(float(np.median(a)), 4),
        coverage_50=round(float(100.0 * (a >= 50).mean()), 4),
        coverage_70=round(float(100.0 * (a >= 70).mean()), 4),
        ci=bootstrap_ci(a, groups),
    )


def _rows(judgments: Iterable[Judgment | dict[str, Any]]) -> list[Judgment]:
    return [j if isinstance(j, Judgment) else Judgment.model_validate(j) for j in judgments]


def candidate_means(judgments: Iterable[Judgment | dict[str, Any]], judge_model: str | None = None):
    """metric → (prompt_id, sample_index) → mean of that candidate's valid judgments."""
    acc: dict[str, dict[tuple[str, int], list[int]]] = {m: defaultdict(list) for m in METRICS}
    for j in _rows(judgments):
        if not j.ok or (judge_model is not None and j.judge_model != judge_model):
            continue
        for m in METRICS:
            v = getattr(j, m)
            if v is not None:
                acc[m][(j.prompt_id, j.sample_index)].append(v)
    return {m: {k: sum(v) / len(v) for k, v in d.items() if v} for m, d in acc.items()}


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 4)


def compute_scores(
    judgments: Iterable[Judgment | dict[str, Any]],
    n_candidates_expected: int,
    test: list[Example] | None = None,
    cfg: Config | None = None,
    duplicates: int = 0,
    length_cut: int = 0,
) -> Scores:
    """Aggregate judgment rows into scores.json. `test` adds per-category means; `cfg` adds
    the governance warnings (judge = generator); `duplicates` and `length_cut` come from
    `candidate_facts` of the predictions."""
    rows = _rows(judgments)
    means = candidate_means(rows)
    seen = {(j.prompt_id, j.sample_index) for j in rows}
    judged = set(means["similarity"]) | set(means["precision"])
    counts = Counts(
        candidates=max(n_candidates_expected, len(seen)),
        judged=len(judged),
        unjudged=len(seen - judged),
        missing=max(0, n_candidates_expected - len(seen) - duplicates),
        duplicates=duplicates,
        length_cut=length_cut,
        judgments=len(rows),
        failed=sum(not j.ok for j in rows),
    )
    failed = next((j for j in rows if not j.ok), None)
    scores = Scores(
        similarity=metric_stats(list(means["similarity"].values()), [pid for pid, _ in means["similarity"]]),
        precision=metric_stats(list(means["precision"].values()), [pid for pid, _ in means["precision"]]),
        counts=counts,
        judge_models=sorted({j.judge_model for j in rows if j.judge_model}),
        failed_reply=((failed.raw or failed.error or "")[:500] or None) if failed else None,
    )
    if test is not None:
        category = {ex.id: ex.category for ex in test}
        per: dict[str, dict[str, list[float]]] = defaultdict(lambda: {m: [] for m in METRICS})
        for m in METRICS:
            for (pid, _), v in means[m].items():
                per[category.get(pid, "unknown")][m].append(v)
        scores.per_category = {
            cat: {**{m: round(statistics.fmean(v[m]), 4) if v[m] else None for m in METRICS},
                  "candidates": max(len(v[m]) for m in METRICS)}
            for cat, v in sorted(per.items())
        }
    if len(scores.judge_models) > 1:
        per_judge = {jm: candidate_means(rows, jm) for jm in scores.judge_models}
        for a, b in combinations(scores.judge_models, 2):
            for m in METRICS:
                keys = sorted(set(per_judge[a][m]) & set(per_judge[b][m]))
                x = [per_judge[a][m][k] for k in keys]
                y = [per_judge[b][m][k] for k in keys]
                mad = round(statistics.fmean(abs(p - q) for p, q in zip(x, y, strict=True)), 4) if keys else None
                scores.agreement.append(Agreement(judges=[a, b], metric=m, n=len(keys), pearson=_pearson(x, y), mean_abs_diff=mad))
    scores.warnings = _warnings(counts, scores.judge_models, cfg)
    return scores


def _warnings(counts: Counts, models: list[str], cfg: Config | None) -> list[str]:
    out = []
    if counts.failed:
        out.append(
            f"{counts.failed} of {counts.judgments} judgments failed (no valid JSON after retries, or a service "
            "error); they are excluded from the scores"
        )
    if counts.unjudged:
        out.append(f"{counts.unjudged} of {counts.candidates} candidates have no valid judgment and are left out of the statistics")
    if counts.missing:
        out.append(f"{counts.missing} of {counts.candidates} candidates were not judged (judge.max_test_prompts or missing rows)")
    if counts.length_cut:
        out.append(f"{counts.length_cut} of {counts.candidates} candidates were cut off by infer.max_new_tokens")
    if cfg is not None:
        generator = cfg.synth_model
        for m in models or judge_models(cfg):
            if m == generator:
                out.append(
                    f"judge model is the same as the generator ({m}): it may favour data it wrote itself; "
                    "set judge.model (or judge.panel) to a different model"
                )
    return out


# ---------------------------------------------------------------------- pass rule
def _condition(scores: Scores, rule: PassRule | PassCondition, baseline: Scores | None) -> PassDecision:
    """One condition: absolute (statistic ≥ threshold) or relative (statistic ≥ ratio × the service's)."""
    value = scores.stat(rule.metric, rule.statistic)
    label = f"{rule.statistic} {rule.metric}"
    ratio = getattr(rule, "relative_to_service", None)
    undefined = (f"{label} is not measured (n/a: no test example has the response format or tools it needs), "
                 "so the rule is not met" if rule.metric in EXACT_METRICS else f"no candidate was judged; {label} is undefined")
    if ratio is not None:
        if baseline is None:
            raise UserError("judge.pass_rule.relative_to_service is set but there are no service-baseline scores")
        base = baseline.stat(rule.metric, rule.statistic)
        if base is None:
            raise UserError(f"the service baseline has no {label} (n/a), so the local {label} cannot be compared with it")
        target = ratio * base
        if value is None:
            return PassDecision(passed=False, value=None, target=target, statistic=rule.statistic, metric=rule.metric,
                                reason=undefined)
        relative = round(value / base, 4) if base > 0 else None
        passed = value >= target
        shown = f"{relative:.1%}" if relative is not None else "n/a (baseline is 0)"
        reason = (f"{label} {value:.2f} is {shown} of the service's {base:.2f}; "
                  f"target {ratio:.0%} ({target:.2f})")
        return PassDecision(passed=passed, value=value, target=target, statistic=rule.statistic, metric=rule.metric,
                            relative=relative, reason=reason)
    target = rule.threshold
    if value is None:
        return PassDecision(passed=False, value=None, target=target, statistic=rule.statistic, metric=rule.metric,
                            reason=undefined)
    relative = None
    if baseline is not None and (base := baseline.stat(rule.metric, rule.statistic)):
        relative = round(value / base, 4)  # shown for information; the absolute rule decides
    passed = value >= target
    return PassDecision(passed=passed, value=value, target=target, statistic=rule.statistic, metric=rule.metric,
                        relative=relative, reason=f"{label} {value:.2f} {'≥' if passed else '<'} {target:g}")


def evaluate_pass(scores: Scores, rule: PassRule, baseline: Scores | None = None) -> PassDecision:
    """Absolute: statistic ≥ threshold. Relative (`rule.relative_to_service`): statistic ≥
    ratio × the service baseline's statistic, i.e. local ÷ service ≥ ratio. Every `rule.also`
    condition must hold too; the decision names those that do not (a metric not measured fails)."""
    main = _condition(scores, rule, baseline)
    if not rule.also:
        return main.model_copy(update={"failed": [] if main.passed else [f"{main.statistic} {main.metric}"]})
    extra = [_condition(scores, c, baseline) for c in rule.also]
    failed = [f"{d.statistic} {d.metric}" for d in (main, *extra) if not d.passed]
    reason = "; ".join(d.reason for d in (main, *extra)) + (f" — not met: {', '.join(failed)}" if failed else "")
    return main.model_copy(update={"passed": not failed, "reason": reason, "also": extra, "failed": failed})


def require_kappa(decision: PassDecision, calibration: Calibration | None, required: float) -> PassDecision:
    """`judge.require_kappa`: the round cannot pass unless the judge agreed with people at κ ≥ `required`."""
    deciding = calibration.deciding() if calibration is not None else None
    if deciding is None:
        why = "no calibration against people yet (label with `llamaduo review`, then run `llamaduo calibrate`)"
    elif deciding.kappa is None:
        why = f"Cohen's kappa of the judge ({deciding.judge}) against people is not measured (n/a)"
    elif deciding.kappa < required:
        why = f"the judge ({deciding.judge}) agrees with people at kappa {deciding.kappa:.2f} < {required:g}"
    else:
        return decision.model_copy(update={"reason": f"{decision.reason}; judge calibrated (kappa {deciding.kappa:.2f})"})
    return decision.model_copy(update={
        "passed": False, "reason": f"{decision.reason}; cannot pass: {why} (judge.require_kappa {required:g})"})
