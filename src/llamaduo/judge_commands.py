"""The commands about trusting the judge: `review` (people label candidates), `calibrate` (the judge
against those labels, plus the bias probes) and `probe` (the probes alone). Thin, like `cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llamaduo.console import SetOpt, call, console, err, fail, run_dir_config


def _report(store) -> None:
    from llamaduo import report as report_mod

    html, _ = call(report_mod.write_report, store)
    console.print(f"report (with the judge card) → {html}", soft_wrap=True)


def calibrate(
    run_dir: Path,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Labels JSONL (default: RUN_DIR/labels.jsonl).")] = None,  # noqa: UP045
    probes: Annotated[bool, typer.Option("--probes/--no-probes", help="Also run the bias probes (cached calls).")] = True,
    items: Annotated[Optional[int], typer.Option("--items", help="Test items the probes use (default 10).")] = None,  # noqa: UP045
    set_: SetOpt = None,
) -> None:
    """The judge against people's labels (Spearman ρ, Cohen's κ, bootstrap CIs) and the bias probes."""
    from llamaduo import calibrate as calibrate_mod
    from llamaduo import views
    from llamaduo.service import ServiceClient
    from llamaduo.store import RunStore

    cfg = run_dir_config(run_dir, set_)
    store = RunStore(run_dir)
    client = ServiceClient(cfg.service, db_path=store.service_db) if probes else None
    try:
        cal = call(calibrate_mod.calibrate, cfg, store, client, labels, probes, items)
    finally:
        if client is not None:
            client.close()
    console.print(views.calibration_table(cal))
    console.print(f"calibration → {store.calibration_path}")
    _report(store)


def probe(
    run_dir: Path,
    items: Annotated[Optional[int], typer.Option("--items", help="Test items the probes use (default 10).")] = None,  # noqa: UP045
    set_: SetOpt = None,
) -> None:
    """Bias probes through the run's judge: reference, empty, padded, truncated, injection, swapped."""
    from llamaduo import probes as probes_mod
    from llamaduo import views
    from llamaduo.service import ServiceClient
    from llamaduo.store import RunStore

    cfg = run_dir_config(run_dir, set_)
    store = RunStore(run_dir)
    client = ServiceClient(cfg.service, db_path=store.service_db)
    try:
        cal = call(probes_mod.probe, cfg, store, client, items)
    finally:
        client.close()
    console.print(views.calibration_table(cal))
    failed = [p.probe for p in cal.probes if p.passed is False]
    if failed:
        err.print(f"[yellow]note:[/] probes failed: {', '.join(dict.fromkeys(failed))}", highlight=False)
    console.print(f"probes → {store.calibration_path}")
    _report(store)


def review(
    run_dir: Path,
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (the next free one if taken).")] = 8765,
    set_: SetOpt = None,
) -> None:
    """A local page to label candidates (score or agree/disagree); labels go to RUN_DIR/labels.jsonl."""
    from llamaduo import review as review_mod
    from llamaduo.store import RunStore

    cfg = run_dir_config(run_dir, set_)
    store = RunStore(run_dir)
    if not store.rounds():
        fail(f"{run_dir}: no judged round to review yet")
    server = call(review_mod.start, cfg, store, port)
    console.print(f"review page on {server.url} — labels → {store.labels_path}; Ctrl-C to stop", soft_wrap=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def register(app: typer.Typer) -> None:
    for command in (review, calibrate, probe):
        app.command()(command)
