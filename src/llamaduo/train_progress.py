"""What a person sees while a round trains: one rich bar (steps, rate, loss) instead of the
Trainer's log dicts, with the libraries' own bars and internal deprecations silenced.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the dataset-map and weight-loading bars (and library-internal deprecations) while training."""
    import datasets
    from transformers.utils import logging as hf_logging

    ds_on, hf_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # Raised inside the libraries for their own calls; nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def rich_progress() -> Any:
    """A one-line rich bar (steps, rate, loss) instead of the Trainer's per-step log dicts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    from llamaduo.progress import RateColumn

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.task: Any = None

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.is_world_process_zero:
                self.bar = Progress(
                    TextColumn("training {task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn("steps"), TimeRemainingColumn(), transient=True,
                )
                self.bar.start()
                self.task = self.bar.add_task("", total=state.max_steps, completed=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(self.task, description=f"loss {float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()
