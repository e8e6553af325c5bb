"""The commands about money: `cost` (the break-even of serving locally, paper Table 2) and
`cache stats` (what the service-call cache saved). Thin, like `cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llamaduo.console import call, console, fail

cache_app = typer.Typer(help="The service-call cache of a run.", no_args_is_help=True)


@cache_app.command("stats")
def cache_stats(run_dir: Path) -> None:
    """Cache hits, misses and money saved by the service-call cache."""
    from llamaduo.service.ledger import cache_stats as read_cache_stats
    from llamaduo.store import RunStore

    store = RunStore(run_dir)
    if not store.service_db.exists():
        fail(f"{run_dir}: no service.sqlite (no service calls yet)")
    stats = call(read_cache_stats, store.service_db)
    console.print_json(data=stats)


def cost(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A finished run: its spend and throughput feed the model.")] = None,  # noqa: UP045
    input_tokens_per_month: Annotated[Optional[float], typer.Option(help="Prompt tokens per month.")] = None,  # noqa: UP045
    output_tokens_per_month: Annotated[Optional[float], typer.Option(help="Completion tokens per month.")] = None,  # noqa: UP045
    service_input_usd_per_mtok: Annotated[Optional[float], typer.Option(help="Service USD per Mtok in.")] = None,  # noqa: UP045
    service_output_usd_per_mtok: Annotated[Optional[float], typer.Option(help="Service USD per Mtok out.")] = None,  # noqa: UP045
    migration_usd: Annotated[Optional[float], typer.Option(help="One-off migration cost.")] = None,  # noqa: UP045
    gpu_price_usd: Annotated[Optional[float], typer.Option(help="Price of one GPU.")] = None,  # noqa: UP045
    gpu_count: Annotated[Optional[int], typer.Option(help="GPUs bought.")] = None,  # noqa: UP045
    power_watts: Annotated[Optional[float], typer.Option(help="Power draw of one GPU (W).")] = None,  # noqa: UP045
    utilisation: Annotated[Optional[float], typer.Option(help="Share of time the GPUs are busy.")] = None,  # noqa: UP045
    electricity_usd_per_kwh: Annotated[Optional[float], typer.Option(help="Electricity price.")] = None,  # noqa: UP045
    horizon_months: Annotated[Optional[int], typer.Option(help="Months projected.")] = None,  # noqa: UP045
    local_tokens_per_s: Annotated[Optional[float], typer.Option(help="Tokens/s one GPU serves.")] = None,  # noqa: UP045
    local_overhead_usd_per_month: Annotated[Optional[float], typer.Option(help="Hosting/operations per month.")] = None,  # noqa: UP045
    save: Annotated[bool, typer.Option("--save", help="Keep these inputs in the run and add the projection to its report.")] = False,
) -> None:
    """Months to break even and savings: serving locally vs staying on the service LLM (paper Table 2)."""
    from llamaduo import cost as cost_mod
    from llamaduo.store import RunStore

    given = {k: v for k, v in locals().items() if k not in ("run_dir", "cost_mod", "RunStore", "save") and v is not None}
    if run_dir is not None:
        store = RunStore(run_dir)
        if save:
            call(cost_mod.save_inputs, store, **given)
        inputs = call(cost_mod.from_run, store, **given)
    else:
        if save:
            fail("--save needs a run directory")
        missing = [k for k in ("input_tokens_per_month", "output_tokens_per_month") if k not in given]
        if missing:
            fail("give " + " and ".join("--" + m.replace("_", "-") for m in missing) + " (or a run directory)")
        inputs = call(cost_mod.make_inputs, **given)
    console.print(cost_mod.render_table(cost_mod.project(inputs)))
    if run_dir is not None and save:
        from llamaduo import report as report_mod

        html, _ = call(report_mod.write_report, store)
        console.print(f"saved; report → {html}")



def register(app: typer.Typer) -> None:
    app.command()(cost)
    app.add_typer(cache_app, name="cache")
