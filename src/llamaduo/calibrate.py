"""Calibration against people: does the judge agree with the people who own the task?

`llamaduo calibrate RUN_DIR` reads people's labels (`labels.jsonl`, see `labels`), finds the
judge's score of each labelled candidate in its round's judgments, and reports per judge (each
model of a panel, and the panel's mean):

- Spearman's ρ between the judge's per-candidate mean and the person's 1-100 score;
- Cohen's κ between pass/fail verdicts at the pass threshold (a candidate passes at the pass
  rule's threshold; for a coverage@k rule, at k), the person's `passed` or their score ≥ it;

each with a 95 % percentile bootstrap CI that resamples test prompts (a prompt's candidates
share its difficulty, as in `scoring.bootstrap_ci`). It then runs the bias probes (`probes`)
and writes `calibration.json`, which the report's judge card and `judge.require_kappa` read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llamaduo.artifacts import Calibration, JudgeAgreement, Label
from llamaduo.config import Config, PassRule
from llamaduo.errors import UserError
from llamaduo.labels import read_labels
from llamaduo.scoring import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, candidate_means
from llamaduo.store import RunStore

if TYPE_CHECKING:
    from llamaduo.service import Client


# ------------------------------------------------------------------- statistics
def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as Spearman's ρ needs)."""
    a = np.asarray(values, dtype=float)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    end = np.cumsum(counts)
    return ((end - counts + 1 + end) / 2.0)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None when fewer than two pairs or either side is constant."""
    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's κ of two pass/fail raters; None when undefined (no pairs, or chance agreement is 1)."""
    if not len(a):
        return None
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    observed = float((x == y).mean())
    px, py = float(x.mean()), float(y.mean())
    chance = px * py + (1 - px) * (1 - py)
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def cluster_bootstrap_ci(
    stat: Callable[[np.ndarray], float | None], groups: Sequence[str], resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float] | None:
    """95 % percentile CI of `stat(row indices)` over resamples of whole groups (test prompts).

    Resamples where the statistic is undefined (e.g. all verdicts alike) are left out; None when
    there are fewer than two groups or under half the resamples give a value."""
    keys = list(dict.fromkeys(groups))
    if len(keys) < 2:
        return None
    members = [np.flatnonzero(np.asarray(groups) == k) for k in keys]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(keys), size=len(keys))])
        v = stat(idx)
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < resamples / 2:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def candidate_threshold(rule: PassRule) -> float:
    """The score at which one candidate passes: k for a coverage@k rule, else the rule's threshold."""
    if rule.statistic.startswith("coverage@"):
        return float(rule.statistic.split("@")[1])
    return float(rule.threshold)


def _r4(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def agreement(
    judge: str, judge_scores: dict[tuple[int, str, int], float], labels: Sequence[Label], threshold: float
) -> JudgeAgreement:
    """ρ and κ (with prompt-level bootstrap CIs) of one judge's per-candidate scores against the labels."""
    scored = [(judge_scores[lb.key], float(lb.score), lb.prompt_id) for lb in labels
              if lb.key in judge_scores and lb.score is not None]
    classified = [(judge_scores[lb.key] >= threshold, lb.passed if lb.passed is not None else lb.score >= threshold,
                   lb.prompt_id) for lb in labels if lb.key in judge_scores and (lb.passed is not None or lb.score is not None)]
    out = JudgeAgreement(judge=judge, scored=len(scored), classified=len(classified))
    if scored:
        js, hs, groups = (np.asarray(v) for v in zip(*scored, strict=True))
        out.spearman = _r4(spearman(js, hs))
        out.spearman_ci = cluster_bootstrap_ci(lambda i: spearman(js[i], hs[i]), list(groups))
    if classified:
        jp, hp, groups = (np.asarray(v) for v in zip(*classified, strict=True))
        out.kappa = _r4(cohen_kappa(jp, hp))
        out.kappa_ci = cluster_bootstrap_ci(lambda i: cohen_kappa(jp[i], hp[i]), list(groups))
        out.agreement = round(float((jp == hp).mean()), 4)
    return out


# ------------------------------------------------------------------- the command
def judge_scores(store: RunStore, metric: str, rounds: Sequence[int]) -> dict[str, dict[tuple[int, str, int], float]]:
    """judge model (and "panel") → (round, prompt_id, sample_index) → the candidate's mean score."""
    out: dict[str, dict[tuple[int, str, int], float]] = {}
    for r in rounds:
        if not store.judgments_path(r).exists():
            continue
        rows = store.read_judgments(r)
        models = sorted({j.judge_model for j in rows if j.ok})
        for name, model in [(m, m) for m in models] + ([("panel", None)] if len(models) > 1 else []):
            means = candidate_means(rows, model)[metric]
            out.setdefault(name, {}).update({(r, pid, k): v for (pid, k), v in means.items()})
    return out


def agreement_with_labels(cfg: Config, store: RunStore, labels_path: Path | None = None) -> Calibration:
    """The agreement part of calibration.json, from a labels file (default: the run's labels.jsonl)."""
    labels = read_labels(labels_path or store.labels_path)
    rule = cfg.judge.pass_rule.judged()  # judge scores only
    threshold = candidate_threshold(rule)
    scores = judge_scores(store, rule.metric, sorted({lb.round for lb in labels}))
    if not scores:
        raise UserError(f"{labels_path or store.labels_path}: no labelled round has judgments; run `llamaduo judge` first")
    matched = {lb.key for lb in labels if any(lb.key in s for s in scores.values())}
    judges = [agreement(name, s, labels, threshold) for name, s in sorted(scores.items(), key=lambda kv: kv[0] == "panel")]
    return Calibration(metric=rule.metric, threshold=threshold, labels=len(labels), matched=len(matched),
                       unmatched=len(labels) - len(matched), judges=judges)


def calibrate(
    cfg: Config, store: RunStore, client: Client | None = None, labels_path: Path | None = None,
    probes: bool = True, items: int | None = None,
) -> Calibration:
    """Agreement with the labels, then (with a client) the bias probes; written to calibration.json."""
    cal = agreement_with_labels(cfg, store, labels_path)
    if probes and client is not None:
        from llamaduo import probes as probes_mod

        cal = probes_mod.add_probes(cfg, store, client, cal, items=items)
    cal.at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_calibration(cal)
    return cal
