"""The `llamaduo monitor` command (registered by `cli`): one library call, printed, exit 1 while drifted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llamaduo.console import call, console


def monitor(
    run_dir: Path,
    json_out: Annotated[bool, typer.Option("--json", help="The whole view as JSON.")] = False,
    worst: Annotated[int, typer.Option("--worst", help="Lowest-scoring live items shown.")] = 5,
) -> None:
    """Live traffic: windows with score and CI, drift events, worst items, shadow spend; exit 1 while drifted."""
    from llamaduo.monitor import production_view, render_text
    from llamaduo.store import RunStore

    view = call(production_view, RunStore(run_dir), worst)
    if json_out:
        typer.echo(json.dumps(view.as_json(), indent=2, ensure_ascii=False))
    else:
        console.print(render_text(view), highlight=False, markup=False)
    if view.drifted:  # for cron and CI: non-zero until the score recovers
        raise typer.Exit(1)
