"""Tables a person reads in the terminal: one run's rounds (`status`) and every run in a folder (`runs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaduo.artifacts import EXACT_METRICS, Calibration
from llamaduo.errors import UserError
from llamaduo.store import RunStore


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


_EXACT_SHOWN = ("schema_valid", "field_accuracy", "arguments_exact")


def _exact(store: RunStore, r: int) -> dict[str, float | None]:
    """A round's exact-metric means (empty: free text, or its scores are missing or unreadable)."""
    try:
        scores = store.read_scores(r) if store.scores_path(r).exists() else None
    except UserError:
        return {}
    return {k: v.mean for k, v in scores.exact.items()} if scores is not None else {}


def status_table(run_dir: Path) -> Any:
    from rich.table import Table

    store = RunStore(run_dir)
    if not store.exists():
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    m = store.read_manifest()
    t = Table(title=f"{run_dir} — {run_state(store, m.state)}; stop reason: {m.stop_reason or '-'}")
    exact = {name: _exact(store, rec.round) for name, rec in m.rounds.items()}
    shown = [c for c in _EXACT_SHOWN if any(c in e for e in exact.values())]
    if shown:  # a structured task: its exact metrics were measured
        shown = list(dict.fromkeys(["schema_valid", "field_accuracy", *shown]))
    for col in ("round", "train examples", "synthetic added", "value", "passed", *shown):
        t.add_column(col, justify="right")
    for name in sorted(m.rounds):
        rec = m.rounds[name]
        best = " *" if m.best_round == rec.round and m.best_value is not None else ""
        rate = rec.decision is not None and rec.decision.metric in EXACT_METRICS  # a share 0-1
        t.add_row(name + best, str(rec.train_examples), str(rec.synthetic_added), _num(rec.value, ".2f" if rate else ".1f"),
                  "yes" if rec.passed else "no", *(_num(exact[name].get(c), ".2f") for c in shown))
    total = m.ledger.total if m.ledger else None
    t.caption = f"service spend ${total.usd if total else 0.0:.4f}, calls {total.calls if total else 0}"
    return t


def run_state(store: RunStore, state: str) -> str:
    """The manifest's state, except that a "running" run nobody holds was killed: `interrupted`."""
    from llamaduo.runlock import held

    return "interrupted" if state == "running" and not held(store) else state


def runs_table(runs_dir: Path) -> Any:
    from rich.table import Table

    if not Path(runs_dir).is_dir():
        raise UserError(f"{runs_dir}: no such directory")
    t = Table(title=f"runs in {runs_dir}")
    for col in ("run", "state", "rounds", "best round", "best value", "spend $", "stop reason"):
        t.add_column(col)
    for d in sorted(Path(runs_dir).iterdir()):
        store = RunStore(d)
        if not store.exists():
            continue
        try:
            m = store.read_manifest()
        except UserError as e:  # one damaged run must not hide the others
            t.add_row(d.name, "unreadable", "-", "-", "-", "-", str(e).split(": ", 1)[-1][:60])
            continue
        t.add_row(
            d.name,
            run_state(store, m.state),
            str(len(m.rounds)),
            f"r{m.best_round:02d}" if m.best_round is not None else "-",
            _num(m.best_value),
            f"{m.spend_usd:.4f}",
            m.stop_reason or "-",
        )
    return t


def _stat(v: float | None, ci: list[float] | None = None) -> str:
    return ("n/a" if v is None else f"{v:.2f}") + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def calibration_table(cal: Calibration) -> Any:
    """`llamaduo calibrate` / `probe`: agreement with people per judge, then the bias probes."""
    from rich.console import Group
    from rich.table import Table

    parts = []
    if cal.judges:
        t = Table(title=f"judge vs people: {cal.matched} of {cal.labels} labels matched; {cal.metric}, pass at {cal.threshold:g}")
        for col in ("judge", "scored", "Spearman ρ [95% CI]", "pass/fail", "Cohen's κ [95% CI]", "agreement"):
            t.add_column(col, justify="left" if col == "judge" else "right")
        for j in cal.judges:
            t.add_row(j.judge, str(j.scored), _stat(j.spearman, j.spearman_ci), str(j.classified),
                      _stat(j.kappa, j.kappa_ci), "n/a" if j.agreement is None else f"{j.agreement:.0%}")
        parts.append(t)
    if cal.probes:
        t = Table(title=f"bias probes on {cal.probe_items} test items; cost ${cal.cost.usd:.4f} "
                        f"({cal.cost.calls} calls, {cal.cost.cached} cached)")
        for col in ("probe", "judge", "items", "similarity", "precision", "check", "value", "result"):
            t.add_column(col, justify="right" if col in ("items", "similarity", "precision", "value") else "left")
        for p in cal.probes:
            result = "n/a" if p.passed is None else ("pass" if p.passed else "[red]FAIL[/]")
            t.add_row(p.probe, p.judge, str(p.items), _num(p.similarity), _num(p.precision), p.check, _num(p.value), result)
        parts.append(t)
    return Group(*parts)
