"""The stage engine: the one place that decides run / skip / invalidate and records a stage.

A stage is identified by a `StageKey` and depends on named input components (config sections,
file hashes, the upstream stage's inputs hash). `Engine.run` hashes them; when the manifest says
the stage is done with the same hash and its outputs exist, it is skipped; otherwise the
changed components are named, the stage is marked running, its work runs, and the result is
recorded with timing and the service spend so far. Every stage of the loop and of the CLI's
single-stage commands goes through here, so the bookkeeping exists once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaduo.artifacts import Ledger, StageKey, StageRecord
from llamaduo.hashing import hash_obj
from llamaduo.progress import Display
from llamaduo.store import RunStore


@dataclass
class Outcome:
    """What a stage's work reports back to the engine."""

    detail: str = ""  # shown after "done in 3.1s"
    fields: dict[str, Any] = field(default_factory=dict)  # counts kept in the stage record
    record: bool = True  # False: not this process's to record (a non-main rank under accelerate)


@dataclass(frozen=True)
class Decision:
    key: StageKey
    inputs_hash: str
    components: dict[str, str]
    previous: StageRecord | None  # the record before this run (e.g. to drop stale checkpoints)
    must_run: bool


def component_hashes(components: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else hash_obj(v) for k, v in components.items()}


class Engine:
    def __init__(self, store: RunStore, display: Display, ledger: Callable[[], Ledger | dict[str, Any] | None] | None = None):
        self.store = store
        self.display = display
        self.ledger = ledger  # the service spend so far; None when no service client was used

    def decide(self, key: StageKey, components: dict[str, Any], outputs: list[Path], force: bool = False) -> Decision:
        hashes = component_hashes(components)
        inputs_hash = hash_obj(hashes)
        rec = self.store.stage_record(key)
        done = rec is not None and rec.status == "done"
        if force:
            return Decision(key, inputs_hash, hashes, rec, must_run=True)
        if done and rec.inputs_hash == inputs_hash and all(p.exists() for p in outputs):
            self.display({"event": "stage_skip", "stage": str(key), "round": key.round})
            return Decision(key, inputs_hash, hashes, rec, must_run=False)
        if done and rec.inputs_hash != inputs_hash:
            changed = sorted(k for k in hashes if rec.components.get(k) != hashes[k]) or ["unknown"]
            self.display({"event": "invalidated", "stage": str(key), "round": key.round, "changed": changed})
        return Decision(key, inputs_hash, hashes, rec, must_run=True)

    def run(
        self, key: StageKey, components: dict[str, Any], outputs: list[Path], work: Callable[[Decision], Outcome],
        force: bool = False,
    ) -> str:
        """Run `work` unless the stage is done with these inputs (or `force`); returns the inputs hash."""
        d = self.decide(key, components, outputs, force)
        if not d.must_run:
            return d.inputs_hash
        # "running" with the new hash tells a resumed train stage its checkpoints are its own. Not before
        # the run directory exists: a prepare that fails on bad data must leave nothing behind.
        tracked = self.store.exists()
        if tracked:
            self.store.mark_stage(key, "running", inputs_hash=d.inputs_hash)
        self.display({"event": "stage_start", "stage": str(key), "round": key.round})
        t0 = time.monotonic()
        try:
            outcome = work(d)
        except Exception:
            if tracked:
                self.record_ledger()  # calls made before the failure were paid for
                self.store.mark_stage(key, "failed", inputs_hash=d.inputs_hash, components=d.components)
            raise
        if not outcome.record:
            return d.inputs_hash
        self.record_ledger()
        fields = {"seconds": round(time.monotonic() - t0, 3), **outcome.fields}
        self.store.mark_stage(key, "done", inputs_hash=d.inputs_hash, components=d.components, **fields)
        self.display(
            {"event": "stage_done", "stage": str(key), "round": key.round, "seconds": time.monotonic() - t0,
             "detail": outcome.detail}
        )
        return d.inputs_hash

    def record_ledger(self) -> None:
        ledger = self.ledger() if self.ledger is not None else None
        if ledger is not None:
            self.store.set_ledger(ledger)

    def upstream(self, key: StageKey) -> str:
        """The inputs hash of the stage `key` consumes, which must have run."""
        from llamaduo.errors import UserError

        prev = key.previous()
        rec = self.store.stage_record(prev) if prev is not None else None
        if prev is None or rec is None or rec.status != "done" or rec.inputs_hash is None:
            raise UserError(f"{self.store.root}: stage {prev} has not run yet (run it before {key})")
        return rec.inputs_hash
