"""How a library stage reports progress without drawing anything.

Stages (service calls, inference, training) are handed a `ProgressReporter` — or a `BarFactory`
that makes one per batch of work — by whoever runs them; `progress.Bar` is the rich one the
CLI and the loop pass. `None` means nobody is watching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class ProgressReporter(Protocol):
    """Told how much work there is and as each piece finishes."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def stop(self) -> None: ...


BarFactory = Callable[[str], ProgressReporter]
"""Makes a reporter for one batch of work, given its description ("judge r01: 72 judge calls")."""


def bar_for(factory: BarFactory | None, description: str) -> ProgressReporter | None:
    return factory(description) if factory is not None else None
