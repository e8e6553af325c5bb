"""What the report shows, read from a run directory's typed artifacts (`collect` → `ReportView`).

Every file is read as its type: `store.read_manifest/read_scores/read_judgments/...`,
`load_examples`, `load_config`. A file not written yet is simply not shown (n/a). A file that
cannot be read is shown as n/a too and listed under "Unreadable pieces", never raised: the
loop rewrites the report after every paid-for round, and one broken round must not cost the
whole page.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from llamaduo import cost as cost_mod
from llamaduo import exact
from llamaduo.artifacts import EXACT_METRICS, METRICS, Judgment, Ledger, LedgerRow, Manifest
from llamaduo.config_file import load_config
from llamaduo.data import Example, load_examples
from llamaduo.errors import UserError
from llamaduo.files import read_rows
from llamaduo.judge import judge_models
from llamaduo.monitor import production_view
from llamaduo.report.views import WORST_N, CostView, ReportView, RoundView, WorstItem
from llamaduo.scoring import candidate_means
from llamaduo.service.ledger import ledger_from_db
from llamaduo.store import EvalTarget, RunStore

T = TypeVar("T")
# What an unreadable file raises: our readers' UserError; JSON and validation errors (both
# ValueError) from readers that do not wrap them (`load_examples`); the OS and SQLite for the
# call log. Anything else is a bug in the report and propagates (the loop still catches it).
UNREADABLE = (UserError, ValueError, OSError, sqlite3.Error)


class Rejection(BaseModel):
    """A row of rejected.jsonl as far as the report reads it (synth and dedup each add their own fields)."""

    model_config = ConfigDict(extra="allow")
    reason: str = "unknown"


class _Reader:
    """Reads the pieces of one run directory, noting each unreadable one instead of raising."""

    def __init__(self, store: RunStore):
        self.store = store
        self.problems: list[str] = []

    def get(self, path: Path | None, read: Callable[[], T], default: T, what: str = "") -> T:
        """`read()`; `default` when `path` is not there (not written yet) or cannot be read (noted)."""
        if path is not None and not path.exists():
            return default
        try:
            return read()
        except UNREADABLE as e:
            line = self._line(what or self._name(path), e)
            if line not in self.problems:  # e.g. a broken manifest, met again by the cost reader
                self.problems.append(line)
            return default

    def _name(self, path: Path | None) -> str:
        if path is None:
            return "n/a"
        return str(path.relative_to(self.store.root)) if path.is_relative_to(self.store.root) else str(path)

    def _line(self, what: str, e: Exception) -> str:
        text = str(e).splitlines()[0][:300] if str(e) else ""
        # A UserError already names its file; paths read best relative to the run shown.
        line = text if isinstance(e, UserError) else f"{what}: {type(e).__name__}: {text}"
        return line.replace(f"{self.store.root}{os.sep}", "")


def collect(store: RunStore) -> ReportView:
    """Read everything the report shows from a run directory; never raises on an unreadable file."""
    rd = _Reader(store)
    manifest = rd.get(store.manifest_path, store.read_manifest, None)
    m = manifest or Manifest()
    cfg = rd.get(store.config_path, lambda: load_config(store.config_path), None)
    view = ReportView(
        name=store.root.name,
        state=manifest.state if manifest is not None else "n/a",
        stop_reason=m.stop_reason,
        best_round=m.best_round,
        best_value=m.best_value,
        simulated=m.simulated_service,
        simulator_label=m.simulator_label,
        updated_at=m.updated_at,
        problems=rd.problems,
    )
    if cfg is not None:
        rule = cfg.judge.pass_rule
        view.metric, view.statistic, view.target = rule.metric, rule.statistic, rule.threshold
        view.relative_to_service = rule.relative_to_service
        view.also = [f"{c.metric} {c.statistic} ≥ {c.threshold:g}" for c in rule.also]
        view.service_model, view.judge_model = cfg.service.model, ", ".join(judge_models(cfg))

    judgments: dict[int, list[Judgment]] = {}
    for r in sorted(set(store.rounds()) | {rec.round for rec in m.rounds.values()}):
        rv, judgments[r] = _round_view(rd, m, r)
        view.rounds.append(rv)
        rec = m.rounds.get(rv.label)
        if rec is not None and rec.decision is not None:  # what the loop actually decided on
            view.metric, view.statistic = rec.decision.metric, rec.decision.statistic
        view.target = rv.target if rv.target is not None else view.target
    for label, target in (("service baseline", "baseline"), ("served model", "accept")):
        rv = _judged_view(rd, RoundView(label=label), target)[0]
        if rv.scores is not None:
            view.references.append(rv)

    used = sorted({jm for rv in view.rounds for jm in rv.judge_models})
    if used:
        view.judge_model = ", ".join(used)
    best = next((rv for rv in view.rounds if rv.round == view.best_round), None)
    if best is not None:
        view.best_value = best.value  # n/a when nothing was judged, whatever the record holds
    elif view.best_round is None:
        valued = [rv for rv in view.rounds if rv.value is not None]
        if valued:
            top = max(valued, key=lambda rv: rv.value or 0.0)
            view.best_round, view.best_value = top.round, top.value
    prepare = m.stage("prepare")
    if prepare is not None and (prepare.train is not None or prepare.test is not None):
        view.split = (prepare.train, prepare.test)
    view.cost = _cost(rd, m)
    tests = rd.get(store.test_path, lambda: {ex.id: ex for ex in load_examples(store.test_path)}, {})
    view.worst_round, view.worst = _worst_items(rd, view, judgments, tests)
    _fill_projection(rd, view)
    view.calibration = rd.get(store.calibration_path, store.read_calibration, None)
    view.production = rd.get(store.monitor_db, lambda: production_view(store), None)
    if store.parity_path.exists():
        view.parity = rd.get(store.parity_path, store.read_parity, None)
    return view


def _judged_view(rd: _Reader, rv: RoundView, target: EvalTarget) -> tuple[RoundView, list[Judgment]]:
    """Scores, candidate distribution and failed judgments of one judged set."""
    store = rd.store
    rv.scores = rd.get(store.scores_path(target), lambda: store.read_scores(target), None)
    rows = rd.get(store.judgments_path(target), lambda: store.read_judgments(target), [])
    means = candidate_means(rows)
    rv.candidate_scores = {mt: sorted(means[mt].values()) for mt in METRICS if means[mt]}
    rv.judge_errors = Counter((j.error or "unparseable judgment").splitlines()[0][:120] for j in rows if not j.ok)
    return rv, rows


def _round_view(rd: _Reader, m: Manifest, r: int) -> tuple[RoundView, list[Judgment]]:
    """One round from its manifest record and its files."""
    store = rd.store
    rv, rows = _judged_view(rd, RoundView(label=f"r{r:02d}", round=r), r)
    rec = m.rounds.get(rv.label)
    if rec is not None:
        rv.train_examples, rv.synthetic_added = rec.train_examples, rec.synthetic_added
        rv.value, rv.passed = rec.value, rec.passed
        d = rec.decision
        if d is not None:
            rv.target, rv.relative = d.target, d.relative
            if rv.scores is not None and rv.scores.stat(d.metric, d.statistic) is None:
                rv.value = None  # no judged candidate: the decision's value is a placeholder, not a score
    else:  # a round still under way: what its files say so far
        synthetic = rd.get(store.synthetic_path(r), lambda: load_examples(store.synthetic_path(r)), None)
        rv.synthetic_added = len(synthetic) if synthetic is not None else None
    rerun = f"rerun `llamaduo synth {store.root} --round {r}`"
    rejected = rd.get(store.rejected_path(r), lambda: read_rows(store.rejected_path(r), Rejection, rerun), [])
    rv.rejected = Counter(x.reason for x in rejected)
    tr = rd.get(store.train_result_path(r), lambda: store.read_train_result(r), None)
    if tr is not None:
        rv.train_loss = tr.train_loss
        rv.train_examples = tr.examples if rv.train_examples is None else rv.train_examples
    return rv, rows


def _read_call_log(path: Path) -> Ledger:
    # Read-only, so a report never takes a write lock on a log a running client owns.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return Ledger.model_validate(ledger_from_db(conn))
    finally:
        conn.close()


def _add(a: LedgerRow | None, b: LedgerRow) -> LedgerRow:
    if a is None:
        return b
    return LedgerRow(**{k: getattr(a, k) + getattr(b, k) for k in LedgerRow.model_fields})


def _cost(rd: _Reader, m: Manifest) -> CostView:
    """Spend per (stage, round): from the call log when present (it is current mid-stage), else the manifest's ledger."""
    db = rd.store.service_db
    ledger, source = rd.get(db, lambda: _read_call_log(db), None), "service.sqlite"
    if (ledger is None or not ledger.by_stage) and m.ledger is not None:
        ledger, source = m.ledger, "manifest ledger"
    if ledger is None:
        return CostView()
    view = CostView(source=source, total_usd=ledger.total.usd, saved_usd=ledger.total.saved_usd, calls=ledger.total.calls)
    stages: dict[str, LedgerRow] = {}
    per_round: dict[int | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, row in ledger.by_stage.items():  # keys: "judge/r02", or "baseline" for calls outside a round
        stage, _, rnd = key.partition("/r")
        stage = stage if stage not in ("", "None") else "other"
        stages[stage] = _add(stages.get(stage), row)
        per_round[int(rnd) if rnd.isdigit() else None][stage] += row.usd
    view.by_stage = dict(sorted(stages.items(), key=lambda kv: -kv[1].usd))
    # Calls without a round (the service baseline) are paid before round 0 starts.
    order = sorted(per_round, key=lambda r: -1 if r is None else r)
    view.by_round = [("before r00" if r is None else f"r{r:02d}", dict(per_round[r])) for r in order]
    return view


def _worst_items(
    rd: _Reader, view: ReportView, judgments: dict[int, list[Judgment]], tests: dict[str, Example]
) -> tuple[int | None, list[WorstItem]]:
    """The lowest-scoring candidates of the best round, with their texts and the judge's reasons."""
    judged = [rv.round for rv in view.rounds if rv.candidate_scores and rv.round is not None]
    if not judged:
        return None, []
    r = view.best_round if view.best_round in judged else judged[-1]
    store = rd.store
    means = candidate_means(judgments[r])
    preds = {(p.prompt_id, p.sample_index): p for p in rd.get(store.predictions_path(r), lambda: store.read_predictions(r), [])}
    # a structured task's candidates, measured exactly (no service call): the structural failure of each
    measured = {k: exact.candidate_metrics(tests[k[0]], p.text) for k, p in preds.items()
                if k[0] in tests and tests[k[0]].structured}
    order = means.get(view.metric) or next((v for v in means.values() if v), {})
    if view.metric in EXACT_METRICS:  # the rule reads an exact metric: its failures first, then the judge's order
        rate = {k: measured[k].values().get(view.metric) if k in measured else None for k in order}
        order = {k: (2.0 if rate[k] is None else rate[k], v) for k, v in order.items()}  # n/a after every value
    worst = sorted(order, key=lambda k: (order[k], k))[:WORST_N]
    reasons: dict[tuple[str, int], list[str]] = defaultdict(list)
    for j in judgments[r]:
        key = (j.prompt_id, j.sample_index)
        for mt in METRICS:
            reason = getattr(j, f"{mt}_reason")
            line = f"{mt}: {reason}" if reason else None
            if line and line not in reasons[key] and len(reasons[key]) < 4:
                reasons[key].append(line)
    items = []
    for key in worst:
        test, pred = tests.get(key[0]), preds.get(key)
        items.append(
            WorstItem(
                prompt_id=key[0],
                sample_index=key[1],
                category=test.category if test else "n/a",
                prompt=(test.prompt if test else "") or "n/a",
                reference=(test.response if test else "") or "n/a",
                candidate=pred.text if pred else "n/a",
                scores={mt: means[mt][key] for mt in METRICS if key in means[mt]},
                reasons=reasons.get(key, []),
                length_cut=pred is not None and pred.finish_reason == "length",
                failure=measured[key].failure if key in measured else None,
                exact={m: v for m, v in measured[key].values().items() if v is not None} if key in measured else {},
            )
        )
    return r, items


def _fill_projection(rd: _Reader, view: ReportView) -> None:
    store = rd.store
    if rd.get(None, lambda: cost_mod.saved_inputs(store), None, "cost inputs") is None:
        view.projection_note = (
            "No cost projection yet: give the monthly token volume once with "
            "`llamaduo cost RUN_DIR --input-tokens-per-month N --output-tokens-per-month N --save`."
        )
        return
    inputs = rd.get(None, lambda: cost_mod.from_run(store), None, "cost inputs")
    if inputs is not None:
        view.projection = cost_mod.project(inputs)
