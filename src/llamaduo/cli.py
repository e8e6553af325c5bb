"""Thin commands: load the config, call one library function, print where the result is.

Heavy libraries are imported inside the commands that need them so `llamaduo --help`,
`config validate` and the service stages start instantly.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamaduo import judge_commands, money_commands
from llamaduo.config import dump_config
from llamaduo.config_file import example_yaml
from llamaduo.console import SetOpt, call, console, err, fail, load_or_exit, run_dir_config

app = typer.Typer(
    help="llamaduo: move a task from a service LLM to a small local model you own.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate llamaduo.yaml.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# ------------------------------------------------------------------------- config
@app.command()
def init(directory: Path = typer.Argument(Path("."), help="Folder to write llamaduo.yaml into.")) -> None:
    """Write a commented example llamaduo.yaml."""
    from llamaduo.files import atomic_write_text

    target = directory / "llamaduo.yaml"
    if target.exists():
        fail(f"{target}: already exists; not overwriting")
    atomic_write_text(target, example_yaml())
    console.print(f"wrote {target}")


@config_app.command("validate")
def config_validate(file: Path, set_: SetOpt = None) -> None:
    """Validate a config file (and --set overrides); exit 2 with the problem on failure."""
    load_or_exit(file, set_)
    console.print(f"{file}: ok")


@config_app.command("show")
def config_show(file: Path, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    cfg = load_or_exit(file, set_)
    console.print(dump_config(cfg), highlight=False, markup=False, end="")


# ------------------------------------------------------------------------ prepare
@app.command()
def prepare(
    config: Annotated[Optional[Path], typer.Argument(help="llamaduo.yaml (optional).")] = None,  # noqa: UP045
    input: Annotated[Optional[Path], typer.Option("--input", help="Coverage dataset file.")] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory to create.")] = None,  # noqa: UP045
    test_fraction: Annotated[Optional[float], typer.Option(help="Share held out for testing.")] = None,  # noqa: UP045
    test_file: Annotated[Optional[Path], typer.Option(help="Use this file as the test split.")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="Split seed.")] = None,  # noqa: UP045
    set_: SetOpt = None,
) -> None:
    """Read, validate and split a coverage dataset into RUN_DIR/data/{train,test}.jsonl."""
    from llamaduo import loop
    from llamaduo import prepare as prepare_mod
    from llamaduo.config import from_dict

    overrides = list(set_ or [])
    if input is not None:
        overrides.append(f"data.input={json.dumps(str(input))}")
    if test_fraction is not None:
        overrides.append(f"data.test_fraction={test_fraction}")
    if test_file is not None:
        overrides.append(f"data.test_file={json.dumps(str(test_file))}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if out is not None:
        out = out.absolute()
        overrides += [f"runs_dir={json.dumps(str(out.parent))}", f"name={json.dumps(out.name)}"]
    cfg = load_or_exit(config, overrides) if config is not None else call(from_dict, {}, overrides, source="command line")
    if cfg.data.input is None:
        fail("no input: pass --input FILE or set data.input in the config")
    result = call(loop.prepare, cfg)
    console.print(prepare_mod.render_stats_table(result.stats))
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"train: {result.train_count}  test: {result.test_count}  →  {cfg.run_dir}/data/")


# ---------------------------------------------------------------------------- run
@app.command()
def run(
    config: Path,
    set_: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard the existing run directory and start over.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only warnings and the final line.")] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="Progress as JSON lines (for CI logs).")] = False,
    from_shadow: Annotated[bool, typer.Option("--from-shadow", help="Add a round trained on shadowed live traffic.")] = False,
) -> None:
    """Run the migration loop: train, infer, judge, synthesize, repeat until the target is met."""
    from llamaduo import loop

    cfg = load_or_exit(config, set_)
    result = call(loop.run, cfg, fresh=fresh, display=_display(quiet, json_lines), from_shadow=from_shadow)
    if result.stop_reason == "service_unavailable":
        fail(f"stopped: {result.detail}", code=3)  # exit 3: nothing wrong with the inputs, retry later
    console.print(f"stop reason: {result.stop_reason}; best round r{result.best_round:02d}  →  {result.run_dir}")


def _display(quiet: bool, json_lines: bool) -> str:
    if json_lines:
        return "json"
    return "quiet" if quiet else "rich"


RoundOpt = Annotated[Optional[int], typer.Option("--round", help="Round number; default: the latest.")]  # noqa: UP045


@app.command()
def train(run_dir: Path, round: RoundOpt = None, set_: SetOpt = None) -> None:
    """Train one round's adapter over a run directory."""
    from llamaduo import loop

    cfg = run_dir_config(run_dir, set_)
    out = call(loop.run_stage, cfg, "train", round)
    console.print(f"adapter → {out}")


@app.command()
def infer(run_dir: Path, round: RoundOpt = None, set_: SetOpt = None) -> None:
    """Generate K candidates per test prompt with one round's adapter."""
    from llamaduo import loop

    cfg = run_dir_config(run_dir, set_)
    out = call(loop.run_stage, cfg, "infer", round)
    console.print(f"predictions → {out}")


@app.command()
def judge(run_dir: Path, round: RoundOpt = None, set_: SetOpt = None) -> None:
    """Judge one round's predictions with the service LLM."""
    from llamaduo import loop

    cfg = run_dir_config(run_dir, set_)
    out = call(loop.run_stage, cfg, "judge", round)
    console.print(f"scores → {out}")


@app.command()
def synth(run_dir: Path, round: RoundOpt = None, set_: SetOpt = None) -> None:
    """Synthesize (and clean) the training data of a round (≥ 1)."""
    from llamaduo import loop

    cfg = run_dir_config(run_dir, set_)
    out = call(loop.run_stage, cfg, "synth", round)
    console.print(f"synthetic data → {out}")


@app.command()
def report(run_dir: Path) -> None:
    """(Re)write report.html and report.md of a run directory."""
    from llamaduo import report as report_mod
    from llamaduo.store import RunStore

    store = RunStore(run_dir)
    if not store.exists():
        fail(f"{run_dir}: not a run directory (no manifest.json)")
    call(store.read_manifest)  # a damaged manifest is said in one line, not rendered as a report
    html, md = call(report_mod.write_report, store)
    console.print(f"report → {html}  ({md.name})", soft_wrap=True)


@app.command()
def status(run_dir: Path) -> None:
    """Where a run stands: rounds, statistics, spend, stop reason."""
    from llamaduo import views

    console.print(call(views.status_table, run_dir))


@app.command()
def runs(runs_dir: Path = typer.Argument(Path("runs"), help="Folder of run directories.")) -> None:
    """List runs with round, best statistic, spend and state."""
    from llamaduo import views

    console.print(call(views.runs_table, runs_dir))


@app.command()
def deploy(run_dir: Path, round: RoundOpt = None, set_: SetOpt = None) -> None:
    """Merge the best round into the base model; export HF dir, GGUFs (f16 + quantized), Ollama Modelfile, model card."""
    from llamaduo import deploy as deploy_mod
    from llamaduo.runlock import locked
    from llamaduo.store import RunStore

    cfg, store = run_dir_config(run_dir, set_), RunStore(run_dir)
    result = call(locked, store, "deploy", deploy_mod.deploy, cfg, store, round)  # one process per run directory
    console.print(f"deployed round r{result.round:02d} → {result.merged_dir}; "
                  + ", ".join(p.name for p in result.gguf.values()) + f"; manifest {result.manifest}")
    for kind, lora in result.adapters.items():
        console.print(f"{kind}: the base's own {kind} weights with the round's LoRA {lora.name}, applied at load time "
                      f"(llama.cpp --lora, the Modelfile's ADAPTER)")
    for w in result.warnings:
        console.print(f"note: {w}")
    if result.failed:  # what succeeded is kept; the failed formats are marked in the manifest
        fail("; ".join(result.failed), code=1)


@app.command()
def serve(
    model_or_run_dirs: Annotated[list[Path], typer.Argument(
        metavar="MODEL_OR_RUN_DIR",
        help="A deployed model or run directory; or several runs (LoRA adapters) to serve on their shared base, "
        "each under its run's name.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="llamaduo.yaml (default: the run's).")] = None,  # noqa: UP045
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,  # noqa: UP045
    fallback: Annotated[bool, typer.Option("--fallback", help="Forward to the service LLM when the local model fails or is slow.")] = False,
    shadow: Annotated[Optional[float], typer.Option("--shadow", help="Share of requests shadowed and judged (0-1).")] = None,  # noqa: UP045
    set_: SetOpt = None,
) -> None:
    """Serve a deployed model (or a run directory's, or several runs on one base) behind an OpenAI-compatible API."""
    from llamaduo import serve as serve_mod
    from llamaduo.store import RunStore

    overrides = list(set_ or []) + (["serve.fallback=true"] if fallback else [])
    overrides += [f"serve.shadow_rate={shadow}"] if shadow is not None else []
    for path in model_or_run_dirs:
        if not path.exists():
            fail(f"{path}: no such model or run directory")
    first = model_or_run_dirs[0]
    if config is not None:
        cfg = load_or_exit(config, overrides)
    elif RunStore(first).config_path.exists():
        cfg = run_dir_config(first, overrides)
    else:
        from llamaduo.config import from_dict

        cfg = call(from_dict, {}, overrides, source="command line")
    shown = " ".join(str(p) for p in model_or_run_dirs)
    console.print(f"serving {shown} on http://{host or cfg.serve.host}:{cfg.serve.port if port is None else port}/v1")
    call(serve_mod.serve, model_or_run_dirs if len(model_or_run_dirs) > 1 else first, cfg, host, port, overrides)


@app.command()
def accept(
    run_dir: Path,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Base URL of a served model, e.g. http://127.0.0.1:8000/v1.")] = None,  # noqa: UP045
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Serve the exported files yourself: 'llamacpp'.")] = None,  # noqa: UP045
    artifact: Annotated[str, typer.Option("--artifact", help="With --runtime: f16|q8_0|q4_k_m|merged|all.")] = "all",
    model: Annotated[Optional[str], typer.Option(help="Model name to ask the endpoint for.")] = None,  # noqa: UP045
    round: RoundOpt = None,
    set_: SetOpt = None,
) -> None:
    """Judge the served model (an endpoint, or the exports through llama.cpp) on the test split; gate on deploy.max_drop."""
    from rich.markdown import Markdown

    from llamaduo import deploy as deploy_mod
    from llamaduo import parity as parity_mod
    from llamaduo.service import ServiceClient
    from llamaduo.store import RunStore

    if (endpoint is None) == (runtime is None) or runtime not in (None, "llamacpp"):
        fail("accept: give either --endpoint URL or --runtime llamacpp")
    cfg = run_dir_config(run_dir, set_)
    store = RunStore(run_dir)
    client = ServiceClient(cfg.service, db_path=store.service_db)
    try:
        result = call(parity_mod.run_parity, cfg, store, client, artifact=artifact, endpoint=endpoint, model=model, round=round)
    finally:
        client.close()
    console.print(Markdown("\n".join(deploy_mod.acceptance_text(result))))
    console.print(f"parity: {store.parity_path}")
    from llamaduo.report import write_report

    with contextlib.suppress(Exception):  # the verdict stands even if the page cannot be rewritten
        console.print(f"report: {write_report(store)[0]}")
    if result.shipped_rejected:
        fail(f"{result.shipped} rejected by the gate (deploy.max_drop={cfg.deploy.max_drop:g}); passes instead: "
             f"{', '.join(result.passes_instead) or 'none'}", code=1)


@app.command()
def capture(
    upstream: Annotated[str, typer.Option("--upstream", help="The service LLM's base URL, e.g. https://api.openai.com/v1.")],
    out: Annotated[Path, typer.Option("--out", help="Coverage JSONL to append exchanges to.")],
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
    redact: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--redact", help="Regex to mask in recorded text (repeatable; replaces the e-mail/phone defaults)."),
    ] = None,
    category_header: Annotated[str, typer.Option(help="Request header naming the category.")] = "x-llamaduo-category",
    redact_kind: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--redact-kind", help="Mask only these kinds (repeatable): api_key, aws_key, vcs_token, chat_token, "
                     "bearer, password, iban, card, email, phone. Default: all."),
    ] = None,
) -> None:
    """A pass-through proxy that records real traffic as coverage data for 'llamaduo prepare'."""
    from llamaduo import capture as capture_mod

    console.print(f"proxy on http://{host}:{port}/v1 → {upstream}; recording to {out}")
    call(capture_mod.capture, upstream, out, host=host, port=port, redact_patterns=redact,
         category_header=category_header, redact_kinds=redact_kind)


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny in-process model: the whole pipeline in ~2 minutes.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/demo).")] = None,  # noqa: UP045
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming.")] = False,
    serve_: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option("--serve/--no-serve", help="Keep serving the deployed model until Ctrl-C (default: when interactive)."),
    ] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Progress as JSON lines.")] = False,
    port: Annotated[int, typer.Option("--port", help="Port for the served model (the next free one if taken).")] = 8000,
    task: Annotated[
        str, typer.Option("--task", help="orders: extract a message into JSON under a schema; tools: route it to a function call."),
    ] = "orders",
) -> None:
    """A complete offline migration: simulated service LLM, real training, judging, deploy and serve."""
    from llamaduo.demo import run as demo_mod

    keep = sys.stdin.isatty() if serve_ is None else serve_
    result = call(
        demo_mod.run_demo, quick=quick, out=out, display=_display(False, json_lines), fresh=fresh, keep_serving=keep, port=port,
        task=task,
    )
    scores = "  ".join(f"r{i:02d}=" + ("n/a" if v is None else f"{v:.1f}") for i, v in enumerate(result.round_values))
    console.print(f"\n[bold]per-round score[/] (precision mean): {scores}")
    console.print(f"stop reason: {result.stop_reason}; best round r{result.best_round:02d}; {result.seconds:.0f}s")
    console.print(f"report   → {result.report}")
    if result.deployed:
        console.print(f"deployed → {result.deployed}")
    if result.endpoint:
        if result.port_note:
            console.print(f"[yellow]note:[/] {result.port_note}")
        console.print(f"served at {result.endpoint}; it answered: ", end="")
        console.print(repr(result.served_reply), highlight=False, markup=False, soft_wrap=True)
        # soft_wrap: a hard line break inside the curl command would break it when pasted.
        console.print(demo_mod.snippets(result), highlight=False, markup=False, soft_wrap=True)
    console.print("\n".join(result.acceptance), highlight=False, markup=False, soft_wrap=True)
    if keep and result.handle is not None:
        console.print("serving — press Ctrl-C to stop")
        try:
            result.handle.wait()
        except KeyboardInterrupt:
            pass
        finally:
            result.handle.stop()
        console.print("stopped serving")


judge_commands.register(app)  # review, calibrate, probe
money_commands.register(app)  # cost, cache stats
from llamaduo.monitor_cli import monitor as _monitor  # noqa: E402  (the command lives with its module)

app.command("monitor")(_monitor)


def main() -> None:
    from llamaduo.progress import silence_third_party_progress

    silence_third_party_progress()
    try:
        app()
    except BrokenPipeError:  # `llamaduo ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
