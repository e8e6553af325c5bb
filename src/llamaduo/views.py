"""Tables a person reads in the terminal: one run's rounds (`status`) and every run in a folder (`runs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaduo.artifacts import Calibration
from llamaduo.errors import UserError
from llamaduo.store import RunStore


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def status_table(run_dir: Path) -> Any:
    from rich.table import Table

    store = RunStore(run_dir)
    if not store.exists():
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    m = store.read_manifest()
    t = Table(title=f"{run_dir} — {run_state(store, m.state)}; stop reason: {m.stop_reason or '-'}")
    for col in ("round", "train examples", "synthetic added", "value", "passed"):
        t.add_column(col, justify="right")
    for name in sorted(m.rounds):
        rec = m.rounds[name]
        best = " *" if m.best_round == rec.round and m.best_value is not None else ""
        t.add_row(name + best, str(rec.train_examples), str(rec.synthetic_added), _num(rec.value), "yes" if rec.passed else "no")
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
