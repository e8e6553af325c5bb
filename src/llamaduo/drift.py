"""Drift: the rolling judged score of live traffic, per window, against the run's target.

Judged shadow pairs are grouped into windows — `serve.monitor_window` pairs each, or
`serve.monitor_window_s` seconds of traffic each — and a window's score is the run's pass
statistic (`judge.pass_rule`: metric and statistic) of its pairs with a bootstrap 95 % CI.

The state changes with hysteresis, so one noisy window does not flip the route back and forth:
- ok → drifted when a window's *upper* CI bound is below the target (the window is worse for sure);
- drifted → ok when a window's *lower* CI bound reaches the target, or two consecutive windows
  score at or above it.
A window with fewer than two judged pairs has no CI and decides nothing. Each change is an event
in the monitoring store; each window is logged to the run's tracker (MLflow) when there is one.
`serve` reads `state` per request: drifted with fallback on means the service answers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llamaduo.config import Config
from llamaduo.monitor_store import MonitorStore, Pair, Window
from llamaduo.scoring import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci

log = logging.getLogger("llamaduo.drift")

RECOVER_STREAK = 2  # consecutive windows at or above target that also end a drift


@dataclass(frozen=True)
class DriftState:
    drifted: bool
    reason: str | None = None


def window_stat(scores: list[float], statistic: str) -> tuple[float | None, list[float] | None]:
    """(value, 95 % CI) of the pass statistic over a window's pair scores; CI None under two pairs."""
    if not scores:
        return None, None
    a = np.asarray(scores, dtype=float)
    if statistic == "median":
        value = float(np.median(a))
        if len(a) < 2:
            return round(value, 4), None
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        meds = np.median(a[rng.integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))], axis=1)
        lo, hi = np.percentile(meds, [2.5, 97.5])
        return round(value, 4), [round(float(lo), 4), round(float(hi), 4)]
    if statistic.startswith("coverage@"):
        a = 100.0 * (a >= float(statistic.split("@")[1]))  # coverage is the mean of an indicator
    value = round(float(a.mean()), 4)
    return value, (bootstrap_ci(a) if len(a) >= 2 else None)


class DriftMonitor:
    """Closes windows from the judged pairs in `store` and keeps the drift state."""

    def __init__(self, cfg: Config, store: MonitorStore, tracker=None, target: float | None = None,
                 clock: Callable[[], float] = time.time):
        rule = cfg.judge.pass_rule.judged()  # judge scores only
        self.metric, self.statistic = rule.metric, rule.statistic
        # An absolute target; a relative rule's target (ratio × service baseline) is passed in by the caller.
        self.target = rule.threshold if target is None else target
        self.size, self.seconds = cfg.serve.monitor_window, cfg.serve.monitor_window_s
        self.store, self.tracker, self.clock = store, tracker, clock
        self._lock = threading.Lock()
        self._streak = 0
        windows = store.windows()
        last = windows[-1] if windows else None
        events = store.events()
        drifted = last is not None and last.state == "drifted"
        self.state = DriftState(drifted, events[-1].reason if drifted and events else None)
        self.last: Window | None = last

    @property
    def drifted(self) -> bool:
        return self.state.drifted

    def _score(self, p: Pair) -> float | None:
        return p.similarity if self.metric == "similarity" else p.precision

    def update(self) -> list[Window]:
        """Close every window that is complete; returns the new windows in order."""
        with self._lock:
            judged = [p for p in self.store.pairs(status="judged", unwindowed=True) if self._score(p) is not None]
            groups = self._time_groups(judged) if self.seconds else self._count_groups(judged)
            return [self._close(pairs, start, end) for pairs, start, end in groups]

    def _count_groups(self, judged: list[Pair]) -> list[tuple[list[Pair], float | None, float | None]]:
        full = len(judged) // self.size
        return [(g, g[0].ts, g[-1].ts) for g in (judged[i * self.size:(i + 1) * self.size] for i in range(full))]

    def _time_groups(self, judged: list[Pair]) -> list[tuple[list[Pair], float | None, float | None]]:
        assert self.seconds is not None
        now = self.clock()
        waiting = [p.ts for s in ("pending", "answered") for p in self.store.pairs(status=s)]
        oldest_waiting = min(waiting) if waiting else math.inf
        by_start: dict[float, list[Pair]] = {}
        for p in judged:
            by_start.setdefault(math.floor(p.ts / self.seconds) * self.seconds, []).append(p)
        # A window closes once its time is over and none of its requests still waits for a judgment.
        return [(ps, start, start + self.seconds) for start, ps in sorted(by_start.items())
                if start + self.seconds <= now and start + self.seconds <= oldest_waiting]

    def _close(self, pairs: list[Pair], start: float | None, end: float | None) -> Window:
        value, ci = window_stat([float(self._score(p)) for p in pairs], self.statistic)  # type: ignore[arg-type]
        event = self._decide(value, ci)
        drifted = event[0] == "drift" if event is not None else self.state.drifted
        state = "drifted" if drifted else "ok"  # the state after this window
        wid = self.store.add_window([p.id for p in pairs], start_ts=start, end_ts=end, metric=self.metric,
                                    statistic=self.statistic, value=value, ci=ci, target=self.target, state=state)
        if event is not None:
            kind, reason = event
            reason = f"window {wid}: {reason}"
            self.store.add_event(kind, wid, reason)
            self.state = DriftState(kind == "drift", reason if kind == "drift" else None)
        self.last = self.store.windows()[-1]
        if self.tracker is not None:
            metrics = {"value": value, "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                       "pairs": float(len(pairs)), "drifted": float(self.state.drifted)}
            try:  # tracking is a side channel: a failing tracker never stops monitoring
                self.tracker.window(wid, {k: float(v) for k, v in metrics.items() if v is not None})
            except Exception as e:
                log.warning("tracking (monitoring window %s) failed: %s: %s", wid, type(e).__name__, e)
        return self.last

    def _decide(self, value: float | None, ci: list[float] | None) -> tuple[str, str] | None:
        if value is None or ci is None:
            return None
        label = f"{self.statistic} {self.metric} {value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
        if not self.state.drifted:
            if ci[1] < self.target:
                return "drift", f"{label} is below the target {self.target:g}"
            return None
        if ci[0] >= self.target:
            self._streak = 0
            return "recovered", f"{label} is above the target {self.target:g}"
        self._streak = self._streak + 1 if value >= self.target else 0
        if self._streak >= RECOVER_STREAK:
            self._streak = 0
            return "recovered", f"{label}: {RECOVER_STREAK} windows in a row at or above the target {self.target:g}"
        return None
