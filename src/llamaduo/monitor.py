"""`llamaduo monitor`: how the deployed model does on live traffic, from the monitoring store.

Windows with their score and CI against the target, drift events, the worst live items (both
answers and the judge's reasons), what shadowing has cost, and whether traffic is drifted now —
the state the last window left, which the command turns into its exit status. The report's
"production" section shows the same view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llamaduo.errors import UserError
from llamaduo.monitor_store import Event, MonitorStore, Pair, Window
from llamaduo.store import RunStore

WORST_LIVE = 5


@dataclass
class ProductionView:
    windows: list[Window] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    worst: list[Pair] = field(default_factory=list)
    pairs: dict[str, int] = field(default_factory=dict)  # by status: judged, pending, failed, ...
    dropped: dict[str, int] = field(default_factory=dict)
    spend_usd: float | None = None  # None: nothing recorded (n/a), not free
    drifted: bool = False
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for p in out["worst"]:
            p.pop("window_id", None)
        return out


def production_view(store: RunStore, worst: int = WORST_LIVE) -> ProductionView:
    """The monitoring store of a run read as one view; a run that was never shadowed is a UserError."""
    if not store.monitor_db.exists():
        raise UserError(f"{store.root}: no monitoring data yet ({store.monitor_db.name}); "
                        "serve with `llamaduo serve RUN_DIR --shadow RATE` first")
    ms = MonitorStore(store.monitor_db)
    try:
        windows, events, spend = ms.windows(), ms.events(), ms.spend()
        view = ProductionView(windows=windows, events=events, worst=ms.worst(worst), pairs=ms.status_counts(),
                              dropped={k.split(":", 1)[1]: v for k, v in ms.counters().items() if ":" in k},
                              spend_usd=sum(spend.values()) if spend else None)
    finally:
        ms.close()
    view.drifted = bool(windows) and windows[-1].state == "drifted"
    drifts = [e for e in events if e.kind == "drift"]
    view.reason = drifts[-1].reason if view.drifted and drifts else None
    return view


def _num(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def render_text(view: ProductionView) -> str:
    """Plain lines for a terminal or a cron mail."""
    judged = view.pairs.get("judged", 0)
    L = [f"state: {'DRIFTED' if view.drifted else 'ok'}" + (f" ({view.reason})" if view.reason else ""),
         f"shadow pairs: {judged} judged of {sum(view.pairs.values())}"
         + "".join(f", {n} {s}" for s, n in sorted(view.pairs.items()) if s != "judged")
         + "".join(f"; dropped ({r}): {n}" for r, n in sorted(view.dropped.items())),
         f"shadow spend: {'n/a' if view.spend_usd is None else f'${view.spend_usd:.4f}'}", "", "windows:"]
    for w in view.windows:
        ci = f"[{_num(w.ci_low)}, {_num(w.ci_high)}]" if w.ci_low is not None else "[n/a]"
        L.append(f"  #{w.id}  n={w.n}  {w.statistic} {w.metric} {_num(w.value)} {ci}  target {_num(w.target, 0)}  {w.state}")
    if not view.windows:
        L.append("  none yet")
    L += ["", "events:"] + [f"  {e.kind}: {e.reason}" for e in view.events] + ([] if view.events else ["  none"])
    L += ["", "worst live items:"]
    for p in view.worst:
        prompt = next((m["content"] for m in reversed(p.messages) if m["role"] == "user"), "")
        L += [f"  pair {p.id}: score {_num(p.score)}", f"    prompt:  {prompt[:200]!r}",
              f"    local:   {p.local_answer[:200]!r}", f"    service: {(p.service_answer or '')[:200]!r}"]
        L += [f"    judge ({k}): {v[:200]}" for k, v in p.reasons.items() if v]
    return "\n".join(L)
