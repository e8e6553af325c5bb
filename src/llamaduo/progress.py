"""How the loop's events reach a person or a CI log: rich lines, quiet, or JSON lines; and the
rich bar (`Bar`) shown while a batch of work runs — the presentation layer, the only one that draws."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from llamaduo.artifacts import EXACT_METRICS

Event = dict[str, Any]
Display = Callable[[Event], None]

_QUIET_KINDS = {"warning", "stop", "invalidated"}


def silence_third_party_progress() -> None:
    """Keep other libraries' progress bars out of llamaduo's output.

    transformers, huggingface_hub, datasets and the GGUF reader draw tqdm bars of their own between
    our lines (and leave carriage-return debris in logs); our own bars already cover that work.
    Set before they are imported; a user's explicit setting of the same variable wins."""
    for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_display(mode: str = "rich", console: Console | None = None) -> Display:
    """Return a function that shows one loop event. Modes: rich, quiet, json."""
    if mode == "json":

        def show_json(event: Event) -> None:
            sys.stdout.write(json.dumps({"ts": round(time.time(), 3), **event}, default=str) + "\n")
            sys.stdout.flush()

        return show_json

    con = console or Console(stderr=True)

    def show(event: Event) -> None:
        kind = event.get("event", "")
        if mode == "quiet" and kind not in _QUIET_KINDS:
            return
        con.print(format_event(event), highlight=False)

    return show


def _exact_text(event: Event) -> str:
    """ · schema_valid 0.97 · field_accuracy 0.88 (· arguments_exact for a tool task); the judge's score when the
    rule reads an exact metric; "" for a free-text task."""
    exact: dict[str, float | None] = event.get("exact") or {}
    parts = []
    judged = event.get("judge")
    if judged:
        v = judged.get("value")
        parts.append(f"{judged['metric']} {judged['statistic']} {'n/a' if v is None else f'{v:.1f}'}")
    if exact:
        shown = ["schema_valid", "field_accuracy"] + (["arguments_exact"] if "tool_name_match" in exact else [])
        for m in shown:
            if m != event.get("metric"):
                v = exact.get(m)
                parts.append(f"{m} {'n/a' if v is None else f'{v:.2f}'}")
    return "".join(f" · {p}" for p in parts)


def format_event(event: Event) -> str:
    kind = event.get("event", "")
    r = event.get("round")
    tag = f"[bold cyan]r{r:02d}[/] " if isinstance(r, int) else ""
    if kind == "stage_start":
        return f"{tag}[bold]{event['stage']}[/] …"
    if kind == "stage_skip":
        return f"{tag}[dim]{event['stage']}: done already (inputs unchanged), skipped[/]"
    if kind == "stage_done":
        detail = event.get("detail", "")
        return f"{tag}{event['stage']} [green]done[/] in {event.get('seconds', 0):.1f}s {detail}"
    if kind == "invalidated":
        return f"{tag}[yellow]{event['stage']}: inputs changed ({', '.join(event['changed'])}); rerunning it and what follows[/]"
    if kind == "round_done":
        value = event.get("value")
        exact = _exact_text(event)
        rate = event.get("metric") in EXACT_METRICS  # an exact metric: a share 0-1, shown with two decimals
        spend = f"spend so far ${event.get('spend_usd', 0.0):.4f}"
        if value is None:  # not measured: never shown as a number
            failed = f"; {event.get('failed_judgments', 0)} of {event.get('judgments', 0)} judgments failed"
            why = "(no answer it applies to)" if rate else f"(no valid judgment{failed})"
            return (f"{tag}[bold]{event['metric']} {event['statistic']} = n/a[/] {why} "
                    f"[red]not measured[/]{exact}  {spend}")
        mark = "[green]PASS[/]" if event.get("passed") else "[red]below target[/]"
        if not event.get("passed") and event.get("failed_conditions"):
            mark = f"[red]below target[/] (not met: {', '.join(event['failed_conditions'])})"
        digits = 2 if rate else 1
        return (
            f"{tag}[bold]{event['metric']} {event['statistic']} = {value:.{digits}f}[/] "
            f"(target {event['target']:.{digits}f}) {mark}{exact}  {spend}"
        )
    if kind == "stop":
        v = event.get("value")
        shown = "n/a" if v is None else f"{v:.1f}"
        return f"[bold]stopped:[/] {event['reason']} — best round r{event['best_round']:02d} ({shown})"
    if kind == "warning":
        return f"[yellow]warning:[/] {event['message']}"
    return f"{tag}{event.get('message', kind)}"


class RateColumn(ProgressColumn):
    """Items per second for rich progress bars."""

    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


class Bar:
    """A transient rich progress bar for one batch of work, with its rate and ETA.

    It implements `reporting.ProgressReporter`, so stages and the network layer never import rich:
    `judge_predictions(..., bars=Bar.factory("calls"))`."""

    def __init__(self, description: str, unit: str = "calls", console: Console | None = None):
        self.description = description
        self.unit = unit
        self.console = console
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    @classmethod
    def factory(cls, unit: str = "calls", console: Console | None = None) -> Callable[[str], Bar]:
        return lambda description: cls(description, unit, console)

    def start(self, total: int) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(self.unit),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
