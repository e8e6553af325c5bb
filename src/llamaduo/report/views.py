"""What the report shows, as plain dataclasses, and how its numbers read as text.

`collect` fills a `ReportView` from the run directory's typed artifacts; `html` and
`markdown` only turn it into text. Nothing here reads a file, so the renderers can be tested
on a hand-built view. `None` always means "not measured" and reads as n/a, never as 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamaduo import cost as cost_mod
from llamaduo.artifacts import EXACT_METRICS, Agreement, Calibration, Counts, LedgerRow, Parity, Scores

if TYPE_CHECKING:
    from llamaduo.monitor import ProductionView

STATS = ("mean", "median", "coverage@50", "coverage@70")
WORST_N = 5
TEXT_LIMIT = 1200  # characters of prompt/reference/candidate shown per worst item
STAGE_COLORS = {"synth": "#f08c00", "judge": "#1971c2", "baseline": "#7048e8", "accept": "#2b8a3e"}
OTHER_COLOR = "#868e96"
METRIC_COLORS = {"similarity": "#74c0fc", "precision": "#1864ab"}


# ------------------------------------------------------------------ what is shown
@dataclass
class RoundView:
    label: str  # r00, r01, ... or "service baseline" / "served model"
    round: int | None = None  # None for the service baseline and the served model
    train_examples: int | None = None
    synthetic_added: int | None = None
    scores: Scores | None = None  # None: scores.json missing or unreadable
    value: float | None = None  # the pass statistic
    target: float | None = None
    passed: bool | None = None
    relative: float | None = None  # local ÷ service baseline, when a baseline was judged
    candidate_scores: dict[str, list[float]] = field(default_factory=dict)  # metric → sorted candidate means
    judge_errors: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # synthesis rejections by reason
    train_loss: float | None = None

    def stat(self, metric: str, statistic: str) -> float | None:
        return self.scores.stat(metric, statistic) if self.scores is not None else None

    def ci(self, metric: str) -> list[float] | None:
        return self.scores.metric(metric).ci if self.scores is not None else None

    @property
    def counts(self) -> Counts | None:
        return self.scores.counts if self.scores is not None else None

    @property
    def agreement(self) -> list[Agreement]:
        return self.scores.agreement if self.scores is not None else []

    @property
    def warnings(self) -> list[str]:
        return self.scores.warnings if self.scores is not None else []

    @property
    def judge_models(self) -> list[str]:
        return self.scores.judge_models if self.scores is not None else []


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
    length_cut: bool = False  # the token limit cut the candidate off (finish_reason "length")
    failure: str | None = None  # a structured task's structural failure (`exact.py`): not JSON, wrong tool, ...
    exact: dict[str, float] = field(default_factory=dict)  # the candidate's exact metrics that apply


@dataclass
class CostView:
    source: str = "none"  # "service.sqlite", "manifest ledger" or "none"
    by_round: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # (label, stage → usd)
    by_stage: dict[str, LedgerRow] = field(default_factory=dict)  # summed over rounds, dearest first
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
    also: list[str] = field(default_factory=list)  # the rule's further conditions, as text ("schema_valid mean ≥ 0.99")
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
    split: tuple[int | None, int | None] | None = None  # coverage train / test sizes, from prepare
    projection: cost_mod.CostProjection | None = None
    projection_note: str = ""
    problems: list[str] = field(default_factory=list)  # unreadable pieces, one line each
    calibration: Calibration | None = None  # the judge card: agreement with people and bias probes
    production: ProductionView | None = None  # monitor.ProductionView once live traffic was shadowed; None: no section
    parity: Parity | None = None  # deploy/parity.json: what shipped, judged through its runtime; None: no section


PARITY_HEAD = ["artifact", "runtime", "score", "95% CI", "vs best round", "95% CI", "identical greedy", "tokens/s",
               "peak RSS MB", "verdict"]


def parity_rows(p: Parity) -> list[list[str]]:
    """The shipping table's cells (plain text; each renderer escapes them)."""
    def ci(v: tuple[float, float] | None) -> str:
        return "n/a" if v is None else f"[{fmt(v[0])}, {fmt(v[1])}]"

    rows = []
    for r in p.rows:
        verdict = ("not measured: " + r.error) if r.error else (
            "rejected" if r.rejected else "n/a" if r.rejected is None else "passes")
        rows.append([r.artifact + (" (shipped)" if r.artifact == p.shipped else ""), r.runtime, fmt(r.value), ci(r.ci),
                     fmt(r.difference, suffix=""), ci(r.difference_ci),
                     "n/a" if r.identical is None else f"{r.identical:.0%}", fmt(r.tokens_per_s),
                     fmt(r.peak_rss_mb, 0), verdict])
    return rows


def parity_verdict(p: Parity) -> str:
    """One sentence: is the shipped artifact accepted, and what passes instead when it is not."""
    if p.shipped is None:
        return "No artifact is marked as shipped."
    if p.shipped_rejected is None:
        return f"The shipped artifact ({p.shipped}) could not be judged."
    if not p.shipped_rejected:
        return f"The shipped artifact ({p.shipped}) is within {p.max_drop:g} points of round {p.round}."
    instead = ", ".join(p.passes_instead) or "none of the others"
    return (f"The shipped artifact ({p.shipped}) is REJECTED: it scores more than {p.max_drop:g} points below round "
            f"{p.round} (beyond the CI). Passes instead: {instead}.")


# ------------------------------------------------------------------ text shared by the renderers
def fmt(v: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{suffix}"


def fmt_usd(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"${v:,.4f}" if abs(v) < 1 else f"${v:,.2f}"


def count_text(v: int | None) -> str:
    return "n/a" if v is None else str(v)


def stat_text(rv: RoundView, metric: str, statistic: str) -> str:
    return fmt(rv.stat(metric, statistic), 1, "%" if statistic.startswith("coverage") else "")


def ci_text(rv: RoundView, metric: str) -> str:
    ci = rv.ci(metric)
    return "" if not ci or len(ci) != 2 else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def digits(metric: str) -> int:
    """Decimals a metric's value reads with: an exact metric is a share 0-1, a judge score 1-100."""
    return 2 if metric in EXACT_METRICS else 1


def rule_text(view: ReportView) -> str:
    what = f"{view.metric} {view.statistic}"
    d = digits(view.metric)
    if view.relative_to_service is not None:  # the target is then ratio × the service's own statistic
        text = f"{what} ≥ {view.relative_to_service:.0%} of the service LLM's ({fmt(view.target, d)})"
    else:
        text = f"{what} ≥ {fmt(view.target, d)}"
    return " and ".join([text, *view.also])


def value_text(rv: RoundView, metric: str = "precision") -> str:
    rel = f" ({rv.relative:.0%} of service)" if rv.relative is not None else ""
    return fmt(rv.value, digits(metric)) + rel


EXACT_HEAD = ["round", *EXACT_METRICS]


def rate_text(rv: RoundView, metric: str) -> str:
    """An exact metric's rate with its 95% CI, or n/a when it does not apply (or scores are missing)."""
    st = rv.scores.exact.get(metric) if rv.scores is not None else None
    if st is None or st.mean is None:
        return "n/a"
    ci = f" [{st.ci[0]:.2f}, {st.ci[1]:.2f}]" if st.ci and len(st.ci) == 2 else ""
    return f"{st.mean:.2f}{ci}"


def exact_rows(view: ReportView) -> list[list[str]]:
    """Plain-text rows: each round's exact metrics (structured tasks); none when no set measured any."""
    sets = view.rounds + view.references
    if not any(rv.scores is not None and rv.scores.exact for rv in sets):
        return []
    return [[rv.label, *(rate_text(rv, m) for m in EXACT_METRICS)] for rv in sets]


def worst_scores_text(it: WorstItem) -> str:
    judged = [f"{mt} {v:.1f}" for mt, v in it.scores.items()]
    return ", ".join(judged + [f"{m} {v:.2f}" for m, v in it.exact.items()])


def simulated_text(view: ReportView) -> str:
    label = (view.simulator_label or "The service LLM in this run was the offline simulator.").rstrip()
    end = "" if label.endswith((".", "!", "?")) else "."
    return f"{label}{end} Scores and costs illustrate the pipeline; they are not a real service model's."


def passed_text(p: bool | None) -> str:
    return "n/a" if p is None else ("pass" if p else "fail")


def clip(s: str) -> str:
    return s if len(s) <= TEXT_LIMIT else s[:TEXT_LIMIT] + f" … [{len(s) - TEXT_LIMIT:,} more characters]"


JUDGING_HEAD = ["round", "candidates", "judged", "unjudged", "not sent", "cut by the token limit", "judgments",
                "failed judgments", "most common failure"]
CUT_TEXT = "cut by the token limit"  # the marker of a candidate that ended at infer.max_new_tokens
AGREEMENT_HEAD = ["round", "judges", "metric", "candidates", "Pearson r", "mean abs. difference"]


def judging_rows(view: ReportView) -> list[list[str]]:
    """Plain-text rows (escape before use): counts of judged and failed per round."""
    rows = []
    for rv in view.rounds + view.references:
        err = rv.judge_errors.most_common(1)
        c = rv.counts
        counts = [count_text(None if c is None else getattr(c, k))
                  for k in ("candidates", "judged", "unjudged", "missing", "length_cut", "judgments", "failed")]
        rows.append([rv.label, *counts, f"{err[0][0]} (×{err[0][1]})" if err else "—"])
    return rows


def agreement_rows(view: ReportView) -> list[list[str]]:
    """Plain-text rows: how far the judges of a panel agree, per round and metric."""
    return [
        [rv.label, " vs ".join(a.judges), a.metric, str(a.n), fmt(a.pearson, 2), fmt(a.mean_abs_diff)]
        for rv in view.rounds + view.references
        for a in rv.agreement
    ]


CALIBRATION_HEAD = ["judge", "scored by people", "Spearman ρ", "95% CI", "pass/fail labels", "Cohen's κ", "95% CI", "agreement"]
PROBE_HEAD = ["probe", "judge", "items", "similarity", "precision", "check", "value", "result"]


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def calibration_rows(cal: Calibration) -> list[list[str]]:
    """Plain-text rows: each judge's agreement with people's labels."""
    return [
        [j.judge, str(j.scored), fmt(j.spearman, 2), _ci(j.spearman_ci), str(j.classified), fmt(j.kappa, 2),
         _ci(j.kappa_ci), "n/a" if j.agreement is None else f"{j.agreement:.0%}"]
        for j in cal.judges
    ]


def probe_rows(cal: Calibration) -> list[list[str]]:
    """Plain-text rows: each bias probe's scores and its check (result last: pass / FAIL / n/a)."""
    return [
        [p.probe, p.judge, str(p.items), fmt(p.similarity), fmt(p.precision), p.check, fmt(p.value),
         "n/a" if p.passed is None else ("pass" if p.passed else "FAIL")]
        for p in cal.probes
    ]


def calibration_text(cal: Calibration) -> str:
    """One line on what the card rests on: labels matched, the pass threshold, the probes' cost."""
    cost = f"probes cost {fmt_usd(cal.cost.usd)} ({cal.cost.calls} calls; reruns are cache hits)" if cal.probes else "no probes run"
    labels = (f"{cal.matched} of {cal.labels} people's labels matched a judged candidate ({cal.metric}, a candidate "
              f"passes at {cal.threshold:g})") if cal.labels else "no people's labels yet (label with `llamaduo review`)"
    return f"{labels}; {cost}; calibrated {cal.at or 'n/a'}."
